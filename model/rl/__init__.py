"""dsaforge.model.rl: GRPO with DeepSeek-V3.2's four stabilisers (paper §3.1).

`grpo` holds the math as pure functions (advantage, clipped surrogate, unbiased KL, off-policy sequence mask, Keep
Sampling Mask renormalisation, loss aggregation); `reward` composes the rewards; `policy` scores sampled tokens
with the training model (Keep Routing, Keep Sampling Mask); `loop` is the `grpo` stage's driver.
"""
