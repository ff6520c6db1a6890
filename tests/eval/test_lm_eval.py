"""The lm-evaluation-harness model class, offline: local task YAMLs over a local JSONL file (multiple choice through
loglikelihood, loglikelihood_rolling, generate_until), each response checked against the model's plain forward."""
import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")      # nothing may come from a hub

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")

DOCS = [
    {"question": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " None"], "label": 0,
     "answer": "a + b", "text": "import os\nprint(os.getcwd())\n"},
    {"question": "for i in range(", "choices": ["10):", "'x'):"], "label": 0, "answer": "10):",
     "text": "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n"},
    {"question": "import", "choices": [" sys", " 123"], "label": 0, "answer": "sys", "text": "x = [1, 2, 3]\n" * 4},
]


def _tasks(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (tmp_path / "mc.yaml").write_text(
        "task: dsaforge_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "roll.yaml").write_text(
        "task: dsaforge_roll\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
        "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (tmp_path / "gen.yaml").write_text(
        "task: dsaforge_gen\n" + common + "output_type: generate_until\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    return tmp_path


def _logp(em, ids):
    with torch.no_grad():
        return F.log_softmax(em.model(torch.tensor([ids]), mode="sparse").logits[0].float(), -1)


def test_lm_eval_tasks_run_offline_and_match_the_model(em, tmp_path):
    from lm_eval.tasks import TaskManager

    from dsaforge.eval.lm_eval_model import DsaforgeLM

    lm = DsaforgeLM.from_eval_model(em, mode="sparse", batch_size=2, max_gen_toks=6)
    out = lm_eval.simple_evaluate(model=lm, tasks=["dsaforge_mc", "dsaforge_roll", "dsaforge_gen"],
                                  task_manager=TaskManager(include_path=str(_tasks(tmp_path)), include_defaults=False),
                                  log_samples=True, bootstrap_iters=0)
    res, samples = out["results"], out["samples"]
    assert 0.0 <= res["dsaforge_mc"]["acc,none"] <= 1.0
    assert res["dsaforge_roll"]["word_perplexity,none"] > 1.0

    for s in samples["dsaforge_mc"]:                      # each choice: sum log p(choice | question), from a forward
        doc = s["doc"]
        ctx = [em.bos] + em.encode(doc["question"])
        for choice, resp in zip(doc["choices"], s["resps"]):
            c = em.encode(" " + choice)                   # lm-eval's target delimiter is one space
            ids = ctx + c
            lp = _logp(em, ids)
            want = sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(c))
            assert resp[0][0] == pytest.approx(want, abs=1e-3)
    for s in samples["dsaforge_roll"]:
        ids = [em.bos] + em.encode(s["doc"]["text"])
        lp = _logp(em, ids)
        want = sum(float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1))
        assert s["resps"][0][0] == pytest.approx(want, abs=1e-3)
    for s in samples["dsaforge_gen"]:                     # greedy decoding by full forwards, no cache
        ids = [em.bos] + em.encode(s["doc"]["question"])
        new = []
        for _ in range(6):
            t = int(_logp(em, ids + new)[-1].argmax())
            if t == em.eos:
                break
            new.append(t)
        assert s["resps"][0][0] == em.decode(new).split("\n")[0]
