"""Interpretability: which attention heads a model uses to answer, and how that differs between
reasoning over Stoney Nakoda and over math. Everything is read at the answer slot.

definitions  the regions, groups and modes, and the report's definitions of every statistic
contexts     what the model reads before the answer slot, with no answer in it
items        an example as token ids up to the slot, with a label per token
attention    attention scores, the probes that collect them, the logit lens
ablation     the answer's log-prob drop when heads are zeroed or mean-ablated
pairs        minimal pairs on the model's own reasoning
patching     activation patching on those pairs
stats        intervals, the declared headline tests, paired deltas
run          one checkpoint, every statistic
figures      the report's PNGs
causal       the report's first screen: what patching found
render       index.html and metrics.json
"""
