"""The local demo: real small language models as OpenAI-compatible tiers, and the router in front of them."""
