"""The capacity simulator: replay request traces against a described cluster.

`vram-operator simulate` answers "how many GPUs for 99% warm hits?" and "which eviction policy
costs the fewest cold-start seconds?" by running the operator's real placement
(`vram_operator.operator.placement`) and the agent's real eviction
(`vram_operator.policy.eviction`) over a trace, in virtual time. Not to be confused with
`vram_operator.simulation`, the fake GPUs and backends the tests and the demo run against.
"""
