"""The Tiergate operator: reconciles RoutingPolicy objects into tiered vLLM ensembles."""
