"""Prompt templates: exact strings, loss masks, validation errors."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from jaxmusic import templates as T
from jaxmusic.models.splice_plan import IGNORE_INDEX, build_splice_plan

# Written out again here (not imported) so a drift in the module's strings fails the test.
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user's questions. ")
AUDIO_ID = -200  # stand-in for one audio placeholder when comparing with the reference algorithm

CONV = [
    {"from": "human", "value": "<audio>\nWhat genre is this song?"},
    {"from": "gpt", "value": "blues rock"},
    {"from": "human", "value": "Compare it with <audio> please."},
    {"from": "gpt", "value": "The second one is (B) faster, at 120 BPM."},
]


def _make_tokenizer(byte_level: bool = True, im_end_special: bool = True):
    """A small byte-level BPE like Qwen's (spaces merge into the following word)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = ["<|endoftext|>"] + (["<|im_end|>"] if im_end_special else [])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [SYSTEM, "USER: What genre is this song? ASSISTANT: blues rock",
              "Compare it with the first one please. The second one is faster, at 120 BPM."]
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>" if im_end_special else "<|endoftext|>")


@pytest.fixture(scope="module")
def tok():
    return _make_tokenizer()


def _text(segments):
    return "".join(s for s, _ in segments)


def _flat(enc: T.TokenizedText):
    """Pieces joined with one AUDIO_ID per placeholder, and labels the reference way."""
    ids, labels = [], []
    for i, (p, m) in enumerate(zip(enc.pieces, enc.loss_masks)):
        if i:
            ids.append(AUDIO_ID)
            labels.append(IGNORE_INDEX)
        ids += p.tolist()
        labels += np.where(m, p, IGNORE_INDEX).tolist()
    return ids, labels


def _label_runs(enc: T.TokenizedText, tok):
    """Decoded text of each maximal run of loss-carrying tokens."""
    runs = []
    for p, m in zip(enc.pieces, enc.loss_masks):
        edges = np.flatnonzero(np.diff(np.r_[0, m.astype(int), 0]))
        runs += [tok.decode(p[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2])]
    return runs


# ----------------------------------------------------------------------- reference algorithm

def _ref_tokenize(text, tok):
    """The reference's tokenizer_image_token: split at <audio>, one image id per tag."""
    ids = []
    for i, chunk in enumerate(text.split("<audio>")):
        if i:
            ids.append(AUDIO_ID)
        ids += tok(chunk, add_special_tokens=False).input_ids
    return ids


def _ref_qwen2_labels(prompt, tok):
    """The reference's round-by-round label masking for qwen2_instruct (re-derived, for comparison)."""
    ids = _ref_tokenize(prompt, tok)
    labels = list(ids)
    cur = 0
    for rnd in prompt.split("<|im_end|>"):
        if rnd == "":
            break
        instruction, answer = rnd.split(" ASSISTANT: ")
        round_len = len(_ref_tokenize(rnd, tok)) + 1           # + the <|im_end|> token
        instr_len = len(_ref_tokenize(instruction + " ASSISTANT: ", tok)) - 1
        labels[cur:cur + instr_len] = [IGNORE_INDEX] * instr_len
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * (len(labels) - cur)
    return ids, labels


# ---------------------------------------------------------------------------------- strings

def test_qwen2_instruct_string_exact():
    turns = T.split_turns(CONV, 2)
    expected = (SYSTEM + "USER: <audio>\nWhat genre is this song? ASSISTANT: blues rock<|im_end|>"
                "USER: Compare it with <audio> please. ASSISTANT: The second one is (B) faster, at 120 BPM.<|im_end|>")
    assert _text(T.render("qwen2_instruct", turns)) == expected
    assert T.SYSTEM == SYSTEM


def test_pretrain_string_exact_question_dropped():
    conv = [{"from": "human", "value": "<audio>\nDescribe the music."}, {"from": "gpt", "value": "A slow ballad."}]
    assert _text(T.render("pretrain", T.split_turns(conv, 1))) == "<audio>A slow ballad.\n"


def test_inference_prompt():
    assert T.inference_prompt("<audio>\nWhat key?", 1) == SYSTEM + "USER: <audio>\nWhat key? ASSISTANT: "
    # no tags: one "<audio>\n" per file in front, the layout of MuFun's training data
    assert T.inference_prompt("Which is faster?", 2) == SYSTEM + "USER: <audio>\n<audio>\nWhich is faster? ASSISTANT: "
    assert T.inference_prompt("Hello", 0).endswith("USER: Hello ASSISTANT: ")
    with pytest.raises(T.TemplateError, match="1 '<audio>' tags in the question but 2 audio files"):
        T.inference_prompt("<audio> and?", 2)


# ----------------------------------------------------------------------------------- labels

def test_instruct_labels_are_exactly_the_answers(tok):
    enc = T.encode_conversation("qwen2_instruct", CONV, 2, tok)
    assert enc.n_audio == 2
    # pieces round-trip to the rendered text, tags removed
    assert "<audio>".join(tok.decode(p.tolist()) for p in enc.pieces) == _text(
        T.render("qwen2_instruct", T.split_turns(CONV, 2)))
    runs = _label_runs(enc, tok)
    answers = [CONV[1]["value"], CONV[3]["value"]]
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        # the space after "ASSISTANT:" is merged into the answer's first token by byte-level BPE
        assert run.endswith(answer + "<|im_end|>")
        assert run[: len(run) - len(answer + "<|im_end|>")] in ("", " ")


def test_instruct_labels_match_reference_algorithm(tok):
    enc = T.encode_conversation("qwen2_instruct", CONV, 2, tok)
    prompt = _text(T.render("qwen2_instruct", T.split_turns(CONV, 2)))
    assert _flat(enc) == _ref_qwen2_labels(prompt, tok)


def test_pretrain_labels_everything_but_audio(tok):
    conv = [{"from": "human", "value": "<audio>\nDescribe."}, {"from": "gpt", "value": "blues rock"}]
    enc = T.encode_conversation("pretrain", conv, 1, tok)
    assert len(enc.pieces[0]) == 0 and enc.loss_masks[1].all()
    assert tok.decode(enc.pieces[1].tolist()) == "blues rock\n"
    ref_ids = _ref_tokenize("<audio>blues rock\n", tok)
    assert _flat(enc) == (ref_ids, [IGNORE_INDEX] + ref_ids[1:])


def test_scoring_labels_answer_and_end(tok):
    enc = T.encode_scoring("<audio>\nWhich genre?", "blues", 1, tok)
    prompt = T.inference_prompt("<audio>\nWhich genre?", 1)
    assert "<audio>".join(tok.decode(p.tolist()) for p in enc.pieces) == prompt + "blues<|im_end|>"
    assert [r.lstrip(" ") for r in _label_runs(enc, tok)] == ["blues<|im_end|>"]
    # same ids and labels as a training sample with that answer
    train = T.encode_conversation("qwen2_instruct", [{"from": "human", "value": "<audio>\nWhich genre?"},
                                                     {"from": "gpt", "value": "blues"}], 1, tok)
    assert _flat(enc) == _flat(train)


def test_prompt_has_no_labels_and_pieces_never_straddle_audio(tok):
    enc = T.encode_prompt("rock<audio>blues<audio>", 2, tok)
    assert not any(m.any() for m in enc.loss_masks)
    decoded = [tok.decode(p.tolist()) for p in enc.pieces]
    assert decoded[0].endswith("rock") and decoded[1] == "blues" and decoded[2] == " ASSISTANT: "


def test_template_feeds_splice_plan(tok):
    enc = T.encode_conversation("qwen2_instruct", CONV, 2, tok)
    plan = build_splice_plan([enc], [[3, 1]], tokens_per_chunk=4, length_buckets=[512],
                             chunk_buckets=[4])
    n_text = sum(len(p) for p in enc.pieces)
    assert plan.lengths[0] == n_text + 4 * 4
    labelled = plan.labels[0][plan.labels[0] != IGNORE_INDEX]
    _, flat_labels = _flat(enc)
    assert labelled.tolist() == [x for x in flat_labels if x != IGNORE_INDEX]
    assert (plan.labels[0][plan.is_audio[0]] == IGNORE_INDEX).all()


# ----------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("conv, n_audio, message", [
    ([], 0, "non-empty list"),
    ([{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}], 0, "expected 'human'"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], 0, "expected 'gpt'"),
    ([{"from": "human", "value": "<audio>a"}], 1, "last message must be from 'gpt'"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": 3}], 0, "string 'value'"),
    ([{"from": "human", "value": "<audio>a"}, {"from": "gpt", "value": "b"}], 2, "1 '<audio>' tags in the questions but 2 audio files"),
    ([{"from": "human", "value": "<audio>a"}, {"from": "gpt", "value": "b <audio>"}], 1, "an answer"),
])
def test_conversation_errors(tok, conv, n_audio, message):
    with pytest.raises(T.TemplateError, match=message):
        T.encode_conversation("qwen2_instruct", conv, n_audio, tok)


def test_other_errors(tok):
    two_turns = [{"from": "human", "value": "<audio>a"}, {"from": "gpt", "value": "b"},
                 {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]
    with pytest.raises(T.TemplateError, match="pretrain renders one '<audio>' per turn: 2 turns but 1 audio files"):
        T.encode_conversation("pretrain", two_turns, 1, tok)
    with pytest.raises(T.TemplateError, match="unknown template 'vicuna'"):
        T.encode_conversation("vicuna", two_turns, 1, tok)
    with pytest.raises(T.TemplateError, match="answer contains"):
        T.encode_scoring("q", "<audio>", 0, tok)
    assert issubclass(T.TemplateError, ValueError)  # the data pipeline catches ValueError-likes
    with pytest.raises(ValueError, match="one special token"):
        T.encode_prompt("q", 0, _make_tokenizer(im_end_special=False))

    class Slow:
        is_fast = False
    with pytest.raises(TypeError, match="fast"):
        T.encode_prompt("q", 0, Slow())
