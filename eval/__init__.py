"""dsaforge.eval: the evaluate stage and its pieces.

- `stage.run(ctx)`: the pipeline stage (suites chosen by `eval.suites`), `report.build`: the HTML report;
- suites: `lm`, `longctx` (long-context), `agentic`, `code` (HumanEval), `reasoning` (reasoning-gym), `efficiency`;
- `checkpoint.EvalModel`: a checkpoint's shared scoring (continuation log-probs, greedy agreement, rolling windows);
- `passk`: pass@k and pass^k; `extract`: answer and code extraction; `compare`: `dsaforge eval compare`;
- `lm_eval_model.DsaforgeLM`: a checkpoint as an lm-evaluation-harness model.
"""
if __name__ == "eval":  # imported under its bare name from a checkout's root: dsaforge/_layout.py
    from dsaforge._layout import hand_over
    hand_over(__name__, __path__[0])
