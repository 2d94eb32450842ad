"""Where model and adapter weights come from, and how they get into the pod.

Every URI resolves to a local path for `pinnace serve`, plus what makes the path exist:
a read-only PVC mount (pvc://), nothing (file://, baked into the image), or a download
init container writing into the cache volume (hf://, s3://, gs://).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pinnace.operator.spec import SecretRef

CACHE_DIR = "/cache"
TMP_DIR = "/tmp"
CACHE_VOLUME = "cache"
TMP_VOLUME = "tmp"
GCS_KEY_DIR = "/var/run/secrets/pinnace/gcs"

# Download tools run as init containers; the hf CLI ships with the runtime image.
AWS_CLI_IMAGE = "docker.io/amazon/aws-cli:2.27.0"
GCLOUD_IMAGE = "gcr.io/google.com/cloudsdktool/google-cloud-cli:522.0.0-slim"


@dataclass(frozen=True)
class Source:
    """A resolved weights location."""

    path: str
    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    download: dict[str, Any] | None = None  # an init container
    storage_uri: str | None = None  # KServe mode: what KServe's storage initializer fetches


def resolve(
    uri: str,
    *,
    slot: str,
    runtime_image: str,
    credentials: SecretRef | None,
    revision: str | None = None,
) -> Source:
    """`slot` names the volume/init container ("model", "adapter-0", ...)."""
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        return Source(path="/" + rest.lstrip("/"))
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        volume = f"{slot}-pvc"
        mount_dir = pvc_mount_dir(slot)
        return Source(
            path=f"{mount_dir}/{sub}".rstrip("/"),
            volumes=[
                {"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
            ],
            mounts=[{"name": volume, "mountPath": mount_dir, "readOnly": True}],
        )
    dest = f"{CACHE_DIR}/{slot}/{scheme}/{rest.strip('/')}"
    if revision:
        dest += f"@{revision}"
    container, volumes = downloader(scheme, rest, dest, slot, runtime_image, credentials, revision)
    return Source(path=dest, volumes=volumes, download=container)


def pvc_mount_dir(slot: str) -> str:
    """Where a pvc:// source's whole claim is mounted (read-only)."""
    return f"/mnt/{slot}-pvc"


def resolve_kserve(uri: str, *, mount_path: str, revision: str | None = None) -> Source:
    """KServe mode: KServe fetches (or mounts, for pvc://) the URI at `mount_path`."""
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        return Source(path="/" + rest.lstrip("/"))
    # KServe spells an hf:// revision as a suffix: hf://org/name:revision.
    storage_uri = f"{uri}:{revision}" if revision else uri
    return Source(path=mount_path, storage_uri=storage_uri)


def downloader(
    scheme: str,
    rest: str,
    dest: str,
    slot: str,
    runtime_image: str,
    credentials: SecretRef | None,
    revision: str | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A container copying `scheme://rest` to `dest` on the cache volume, and its volumes."""
    env: list[dict[str, Any]] = [{"name": "HOME", "value": TMP_DIR}]
    mounts: list[dict[str, Any]] = [
        {"name": CACHE_VOLUME, "mountPath": CACHE_DIR},
        {"name": TMP_VOLUME, "mountPath": TMP_DIR},
    ]
    volumes: list[dict[str, Any]] = []
    env_from: list[dict[str, Any]] = []
    if scheme == "hf":
        image = runtime_image
        command = ["hf", "download", rest.strip("/"), "--local-dir", dest]
        command += ["--revision", revision] if revision else []
        env.append({"name": "HF_HOME", "value": f"{CACHE_DIR}/hf"})
        if credentials:
            ref: dict[str, Any] = {"name": credentials.name, "key": "HF_TOKEN", "optional": True}
            env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}})
    elif scheme == "s3":
        image = AWS_CLI_IMAGE
        command = ["aws", "s3", "sync", f"s3://{rest}", dest]
        if credentials:  # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL
            env_from.append({"secretRef": {"name": credentials.name}})
    else:  # gs
        image = GCLOUD_IMAGE
        command = ["gcloud", "storage", "rsync", "--recursive", f"gs://{rest}", dest]
        env.append({"name": "CLOUDSDK_CONFIG", "value": f"{TMP_DIR}/gcloud"})
        if credentials:
            volume = f"{slot}-gcs-key"
            volumes.append({"name": volume, "secret": {"secretName": credentials.name}})
            mounts.append({"name": volume, "mountPath": GCS_KEY_DIR, "readOnly": True})
            key_file = f"{GCS_KEY_DIR}/key.json"
            env.append({"name": "CLOUDSDK_AUTH_CREDENTIAL_FILE_OVERRIDE", "value": key_file})
    container: dict[str, Any] = {
        "name": f"download-{slot}",
        "image": image,
        "command": command,
        "env": env,
        "volumeMounts": mounts,
    }
    if env_from:
        container["envFrom"] = env_from
    return container, volumes
