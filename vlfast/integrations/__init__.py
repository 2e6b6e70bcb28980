"""Drop-in hooks into other libraries. Each submodule imports its library on use:
vlfast.integrations.transformers (causal-LM loss through vlfast.linear_cross_entropy)."""
