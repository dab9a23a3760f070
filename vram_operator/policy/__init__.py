"""Pure residency rules shared by the operator and the agents.

The operator decides what is swapped out for a model requests wait for; an agent decides what
it demotes under memory pressure. Both must price a model's eviction the same way, and the
operator and the agent may not import each other (import-linter), so the rule lives here,
beside neither: no clock, no I/O, the API models only.
"""
