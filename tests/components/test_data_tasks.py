"""VQA and VCR datasets: soft scores by hand, vocabulary, rejected rows, choice expansion, training steps, S3."""

from __future__ import annotations

import re

import pytest
import torch

from components import storage
from components.data.collate import Collator, model_inputs
from components.data.common import DataError, EmptySplitError, MissingFeaturesError
from components.data.tasks import TASKS, AnswerVocab, TaskFiles, VCRDataConfig, VCRDataset, VQADataset
from components.data.tasks.vcr import multiple_choice_logits, vcr_text
from components.data.tasks.vqa import VQADataConfig, predicted_answers
from model import ViLBertForTasks
from tests.components.test_data_world import BROKEN, TINY, World, shared_world


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return shared_world(tmp_path_factory)


def files_of(world: World) -> TaskFiles:
    return TaskFiles(world.root, world.validation)


def train_step(dataset, task: str, num_answers: int = 3, size: int = 4) -> torch.Tensor:
    """Forward + backward of the tiny task model on a collated batch; returns the loss."""
    batch = Collator(pad_token_id=0)([dataset[i] for i in range(size)])
    torch.manual_seed(0)
    model = ViLBertForTasks(TINY, num_answers=num_answers)
    spec = TASKS[task]
    out = model(**model_inputs(batch), heads=spec.heads)
    loss = spec.loss(out, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vilbert.parameters())
    return loss


# --- VQA ----------------------------------------------------------------------------------------------------

VOCAB = AnswerVocab(["yes", "no", "2", "red", "dark red", "blue"])


@pytest.mark.parametrize(
    ("humans", "expected"),
    [
        (["yes"] * 9 + ["no"], {"yes": 1.0, "no": 0.3}),
        (["red"] * 2 + ["dark red"] * 3 + ["blue"] * 5, {"red": 0.6, "dark red": 0.9, "blue": 1.0}),
        # humans that disagree are normalised like the prediction (vqaEval.py): "Yes." -> "yes"
        (["Yes."] + ["yes"] * 2 + ["no"] * 7, {"yes": 0.9, "no": 1.0}),
        # ... number words included: "two" -> "2"
        (["two"] * 4 + ["2"] * 1 + ["no"] * 5, {"2": 1.0, "no": 1.0}),
        # all ten identical: the raw prediction is compared, so the vocabulary's "2" does not match "two"
        (["two"] * 10, {}),
        (["green"] * 10, {}),
    ],
)
def test_soft_scores_are_the_official_accuracy(humans: list[str], expected: dict[str, float]) -> None:
    scores = VOCAB.scores(humans)
    want = torch.zeros(len(VOCAB))
    for answer, value in expected.items():
        want[VOCAB.index[answer]] = value
    assert torch.allclose(scores, want, atol=1e-6)


def test_soft_scores_equal_the_simplified_table_for_ten_answers() -> None:
    for count in range(11):
        humans = ["yes"] * count + ["no"] * (10 - count)
        assert VOCAB.scores(humans)[0].item() == pytest.approx(min(0.3 * count, 1.0))


def test_vocabulary_counts_normalised_answers_and_round_trips(tmp_path) -> None:
    entries = [{"multiple_choice_answer": a} for a in ["Yes", "yes", "two", "2", "red", "yes."]]
    vocab = AnswerVocab.build(entries, min_count=2)
    assert vocab.answers == ["yes", "2"] and vocab.counts == [3, 2]
    vocab.save(tmp_path / "answer_vocab.json")
    again = AnswerVocab.load(tmp_path / "answer_vocab.json")
    assert again.answers == vocab.answers and again.min_count == 2
    with pytest.raises(DataError, match="no answer is the multiple-choice answer of >= 5 questions"):
        AnswerVocab.build(entries, min_count=5)
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(DataError, match="not an answer vocabulary"):
        AnswerVocab.load(tmp_path / "other.json")


def test_vqa_items_drop_rejected_questions_and_train(world: World) -> None:
    files = files_of(world)
    vocab = AnswerVocab.from_task_files(files, min_count=2)
    ds = VQADataset(files, world.regions(), world.tokenizer, vocab)
    assert ds.report.dropped == {"rejected": 1} and ds.report.reconciled
    assert int(BROKEN["vqa_questions"]) not in {it["question"]["question_id"] for it in ds.items}
    item = ds[0]
    scores = item["labels"]["answer_scores"]
    assert scores.shape == (len(vocab),) and item["meta"]["image_id"].startswith("syn-")
    assert torch.allclose(scores, vocab.scores(item["meta"]["answers"]))
    assert scores.max() == 1.0  # the canonical answer is given by >= 4 of the 10 humans in the synthetic world
    loss = train_step(ds, "vqa", num_answers=len(vocab))
    assert loss > 0
    assert predicted_answers(torch.eye(len(vocab))[:2], vocab) == vocab.answers[:2]


def test_vqa_without_validation_meets_the_broken_row(world: World) -> None:
    vocab = AnswerVocab(["yes"])
    with pytest.raises(MissingFeaturesError, match="987654"):
        VQADataset(TaskFiles(world.root), world.regions(), world.tokenizer, vocab)
    with pytest.raises(DataError, match="v2_OpenEnded_mscoco_nope_questions.json not found"):
        VQADataset(files_of(world), world.regions(), world.tokenizer, vocab, VQADataConfig(split="nope"))


def test_vqa_reads_task_files_and_vocabulary_from_s3(world: World, s3_bucket: str) -> None:
    root, validation = f"{s3_bucket}/data", f"{s3_bucket}/validation"
    storage.sync_up(world.root / "tasks", f"{root}/tasks")
    storage.sync_up(world.root / "annotations", f"{root}/annotations")
    storage.sync_up(world.validation, validation)
    files = TaskFiles(root, validation)
    vocab = AnswerVocab.from_task_files(files, min_count=2)
    vocab.save(f"{s3_bucket}/ckpt/answer_vocab.json")
    assert AnswerVocab.load(f"{s3_bucket}/ckpt/answer_vocab.json").answers == vocab.answers
    ds = VQADataset(files, world.regions(), world.tokenizer, vocab, VQADataConfig(split="val"))
    local = VQADataset(files_of(world), world.regions(), world.tokenizer, vocab, VQADataConfig(split="val"))
    assert len(ds) == len(local) > 0 and torch.equal(ds[0]["input_ids"], local[0]["input_ids"])


# --- VCR ----------------------------------------------------------------------------------------------------


def test_vcr_expands_each_question_to_four_pairs(world: World) -> None:
    ds = VCRDataset(files_of(world), world.regions(), world.tokenizer)
    assert ds.report.dropped == {"rejected": 1} and BROKEN["vcr"] not in {it["row_id"] for it in ds.items}
    item, row = ds[1], ds.items[1]["row"]
    t = item["input_ids"].shape[1]
    assert item["input_ids"].shape == (4, t) and item["features"].shape[0] == 4
    assert torch.equal(item["features"][0], item["features"][3])  # the same image for every answer
    assert int(item["labels"]["choice"]) == row["answer_label"]
    tok = world.tokenizer
    for k, answer in enumerate(row["answer_choices"]):
        ids = item["input_ids"][k][item["attention_mask"][k].bool()]

        def letters(text: str) -> str:
            return re.sub(r"\W", "", text)

        assert letters(tok.decode(ids)) == f"CLS{letters(row['question'].lower())}SEP{letters(answer.lower())}SEP"
        types = item["token_type_ids"][k][: len(ids)]
        first_sep = int((ids == tok.sep_token_id).nonzero()[0])
        assert (types[: first_sep + 1] == 0).all() and (types[first_sep + 1 :] == 1).all()
    batch = Collator(pad_token_id=tok.pad_token_id)([ds[0], ds[1], ds[2]])
    assert batch["input_ids"].shape[0] == 12 and batch["labels"]["choice"].shape == (3,)
    assert torch.equal(batch["input_ids"][4 + 2, :t], item["input_ids"][2])  # row b * 4 + k

    torch.manual_seed(0)
    model = ViLBertForTasks(TINY, num_answers=2)
    out = model(**model_inputs(batch), heads=TASKS["vcr"].heads)
    assert multiple_choice_logits(out, batch).shape == (3, 4)
    TASKS["vcr"].loss(out, batch).backward()


def test_vcr_token_lists_and_bad_input(world: World) -> None:
    assert vcr_text(["Why", "is", [0, 2], "here", "?"], ["person", "dog", "cat"]) == "Why is person and cat here ?"
    with pytest.raises(DataError, match="string or a token list"):
        vcr_text(3, [])
    with pytest.raises(DataError, match=r"tasks/vcr/nope\.jsonl not found"):
        VCRDataset(files_of(world), world.regions(), world.tokenizer, VCRDataConfig(split="nope"))
    empty = world.root.parent / "empty_vcr"
    (empty / "tasks/vcr").mkdir(parents=True, exist_ok=True)
    (empty / "tasks/vcr/train.jsonl").write_text("")
    with pytest.raises(EmptySplitError, match="VCR questions: split 'train' has no usable rows"):
        VCRDataset(TaskFiles(empty), world.regions(), world.tokenizer)
