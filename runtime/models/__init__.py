"""Model architectures on shared layers, a registry keyed by HF architecture, and loaders."""
