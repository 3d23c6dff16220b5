"""An OpenAI-compatible LLM gateway that fails over between providers."""
