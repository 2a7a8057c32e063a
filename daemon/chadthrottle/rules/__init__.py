"""Rules: limits that outlive a pid (DESIGN.md §2b).

model (the Rule and its keys, ids, precedence) · glob (exe patterns) · ruleset (an immutable
set of rules) · store (rule files and the runtime state) · match (which rule limits a
process; what the kernel can decide) · procinfo (the facts of a process, from /proc).
Nothing here touches BPF or the bus: the daemon connects rules to the engine.
"""
