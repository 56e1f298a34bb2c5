"""The lmms-eval and VLMEvalKit adapters answer a small fake task: requests of the documented shapes are fed
straight to the adapter methods (neither harness is installed, and none of their data can be downloaded)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from data_pipeline import shapes
from tests import evals_fixtures as fx

pytestmark = pytest.mark.unit


@dataclass
class FakeInstance:
    """lmms-eval `Instance` as the model sees it: only `.args` is read."""
    args: tuple


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from evals.adapters.core import MultimodalModel

    tmp = str(tmp_path_factory.mktemp("evtok"))
    ho = fx.heldout(tmp, 4)
    mm = MultimodalModel(fx.context(tmp, fx.oracle_model(tmp, ho), ho, choice_mc=4))
    docs = []  # the fake task: held-out scenes with their question and answer key
    for it, t in zip(ho.vqa, ho.t2i):
        docs.append({"image": shapes.render(t.scene), "question": it.question, "answer": it.reference})
    return mm, ho, docs


def test_lmms_eval_generate_until_and_loglikelihood(env):
    from evals.adapters.lmms_eval import LmmsEvalMethods

    mm, ho, docs = env
    lm = LmmsEvalMethods(model=mm)
    lm.task_dict = {"shapes_vqa": {"val": docs}}
    to_visual = lambda doc: [doc["image"]]  # noqa: E731
    gen = [FakeInstance((d["question"], {"until": ["\n"], "max_new_tokens": 8}, to_visual, i, "shapes_vqa",
                         "val")) for i, d in enumerate(docs)]
    answers = lm.generate_until(gen)
    assert answers == [d["answer"] for d in docs]  # the oracle answers exactly through the adapter's own prompt
    # loglikelihood: the right answer (as a callable doc_to_target) beats a wrong one (as a string).
    ll = lm.loglikelihood([FakeInstance((d["question"], lambda doc: doc["answer"], to_visual, i, "shapes_vqa",
                                         "val")) for i, d in enumerate(docs)])
    wrong = lm.loglikelihood([FakeInstance((d["question"], "zzz" if d["answer"] != "zzz" else "yes",
                                            to_visual, i, "shapes_vqa", "val")) for i, d in enumerate(docs)])
    assert all(r[0] > w[0] for r, w in zip(ll, wrong))
    assert all(isinstance(g, bool) for _, g in ll) and all(g for _, g in ll) and not any(g for _, g in wrong)


def test_vlmevalkit_generate_inner(env, tmp_path):
    from evals.adapters.vlmevalkit import VLMEvalKitMethods

    mm, ho, docs = env
    vlm = VLMEvalKitMethods(model=mm, max_new_tokens=8)
    got = []
    for i, d in enumerate(docs):
        path = tmp_path / f"{i}.png"
        d["image"].save(path)
        got.append(vlm.generate_inner([dict(type="image", value=str(path)),
                                       dict(type="text", value=d["question"])], dataset="shapes_vqa"))
    assert got == [d["answer"] for d in docs]
    with pytest.raises(ValueError, match="video"):
        vlm.generate_inner([dict(type="video", value="x.mp4")])


def test_register_needs_the_harness_package():
    from evals.adapters import lmms_eval, vlmevalkit

    for mod, name in ((lmms_eval, "lmms-eval"), (vlmevalkit, "VLMEvalKit")):
        try:
            mod.register()
        except ImportError as e:
            assert name in str(e)
