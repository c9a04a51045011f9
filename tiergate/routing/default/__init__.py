"""The shipped default routers (package data; JSON artifacts, see tiergate/routing/artifact.py).

- `two-tier.json`: mixtral-8x7b-instruct (weak) -> gpt-4-1106-preview (strong), trained on the `split == "train"`
  rows of RouteLLM's MMLU and GSM8K outcome files.
- `multi-tier.json`: LLMRouter's 9 open models with list prices (input + output $/Mtok), trained on
  llmrouter-train.jsonl (every row is `split == "train"`).

The data stays out of the repository. Rebuild (from the repository root; the data's folder as in README.md,
"Routing data"):

    D=${TIERGATE_ROUTING_DATA:-../shared/data/routing}
    tiergate train --data $D/routellm-mmlu.jsonl --data $D/routellm-gsm8k.jsonl \\
        --weak mixtral-8x7b-instruct --strong gpt-4-1106-preview --ridge-share 0.5 \\
        --created 2026-11-28T00:00:00+00:00 --out tiergate/routing/default/two-tier.json
    tiergate train --data $D/llmrouter-train.jsonl \\
        --tiers qwen2.5-7b-instruct,codegemma-7b,gemma-2-9b-it,llama-3.1-8b-instruct,llama3-chatqa-1.5-8b,\\
mistral-7b-instruct-v0.3,llama-3.3-nemotron-super-49b-v1,llama-3.1-nemotron-51b-instruct,llama3-chatqa-1.5-70b \\
        --prices $D/llmrouter-models.json --neighbours 50 --task-weight 0 --task-head 0.7 --epochs 80 \\
        --created 2026-11-28T00:00:00+00:00 --out tiergate/routing/default/multi-tier.json

Training is seeded; with the same data, flags and `--created`, the head weights come out the same on the same
machine and library versions.
"""
