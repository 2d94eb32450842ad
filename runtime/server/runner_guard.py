"""One runner per server (vLLM's `--runner`): the other runner's endpoints answer 404.

A pooling server serves /v1/embeddings; a generate server serves completions, chat and
KServe inference. A request for the other kind gets the error in its route's shape (OpenAI
or KServe) saying which runner is on and how to get the other, instead of a bare 404 or a
500 from deep inside the engine. These routes are registered before the real ones, so they
win for the paths they name.
"""

from __future__ import annotations

from fastapi import APIRouter

from pinnace.runtime.server.errors import APIError

# The POST paths of each runner's endpoints. KServe V2 infer (REST and gRPC) is served by
# both: with embeddings out on a pooling server (kserve_embeddings.py).
GENERATE_PATHS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models/{name:path}:predict",
    "/v2/models/{name:path}/generate",
    "/v2/models/{name:path}/generate_stream",
)
POOLING_PATHS = ("/v1/embeddings",)


def wrong_runner(runner: str, needed: str) -> APIError:
    """The 404 for an endpoint of runner `needed` on a server running `runner`."""
    what = "text generation" if needed == "generate" else "embeddings"
    return APIError(
        404,
        f"This model is served with --runner {runner}, which does not serve {what}; "
        f"start the server with --runner {needed} for this endpoint.",
    )


def build_runner_guard_router(runner: str) -> APIRouter:
    """404s for the endpoints `runner` does not serve."""
    router = APIRouter(include_in_schema=False)
    needed = "pooling" if runner == "generate" else "generate"
    paths = POOLING_PATHS if needed == "pooling" else GENERATE_PATHS

    async def refuse() -> None:
        raise wrong_runner(runner, needed)

    for path in paths:
        router.add_api_route(path, refuse, methods=["POST"])
    return router
