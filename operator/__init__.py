"""Pinnace operator: reconciles `LLMDeployment` resources (group pinnace.dev)."""
