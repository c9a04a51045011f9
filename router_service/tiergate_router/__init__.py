"""The Tiergate router: classify prompts, dispatch to tiers, fall back, measure."""
