"""worker/data.py: formats, malformed lines, rows the tokenizer rejects, rows with no target
tokens, truncation counts, weights — in memory and streaming."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from shared import config as cfg
from shared.errors import DataError
from worker import data, datafiles


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_model)


def _config(**training) -> cfg.Config:
    return cfg.resolve({"model": "m", "data": "d", "training": training})


def _write(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.mark.parametrize(
    "record",
    [
        {"text": "the fox jumps"},
        {"prompt": "the fox", "completion": "jumps"},
        {"messages": [{"role": "user", "content": "the fox"},
                      {"role": "assistant", "content": "jumps"}]},
    ],
    ids=["text", "completions", "chat"],
)
def test_each_mlx_lm_format_tokenises(tmp_path: Path, tokenizer, record: dict) -> None:
    path = _write(tmp_path / "train.jsonl", [record] * 3)
    ex = data.load_split(path, tokenizer, _config(), 0.0)
    tokens, offset, weight = ex.get(0)
    assert len(tokens) > 2 and offset == 0 and weight == 1.0
    assert tokens[-1] == tokenizer.eos_token_id


def test_malformed_lines_are_skipped_counted_and_named(tmp_path: Path, tokenizer) -> None:
    lines = [{"text": f"good {i}"} for i in range(8)]
    lines[2] = "{not json"
    lines[5] = {"txt": "wrong key"}
    lines.insert(7, "")
    lines.append({"text": "x", "auth_weight": 1.5})
    path = _write(tmp_path / "train.jsonl", lines)
    index = data.scan(path, _config())
    assert index.report.malformed == 3 and index.report.blank == 1 and len(index) == 6
    assert index.report.examples[0].startswith("line 3: invalid JSON")
    assert index.report.examples[1].startswith("line 6: expected a 'text'")
    assert "line 10: auth_weight must be a number in [0, 0.99]" in index.report.examples[2]


def test_a_mostly_malformed_file_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.jsonl", ["{bad"] * 6 + [{"text": "ok"}] * 4)
    with pytest.raises(DataError, match=r"train.jsonl: 6 of 10 lines are malformed"):
        data.scan(path, _config())


def test_mixed_formats_count_as_malformed(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.jsonl",
                  [{"text": "a b"}] * 3 + [{"prompt": "a", "completion": "b"}])
    index = data.scan(path, _config())
    assert index.report.malformed == 1 and "expected text format" in index.report.examples[0]


def test_distrust_weights_follow_the_documented_formula(tmp_path: Path, tokenizer) -> None:
    rows = [(0.0, 0.0), (0.9, 0.0), (0.0, 2.0), (0.5, 1.0), (0.99, 0.3)]
    path = _write(tmp_path / "train.jsonl", [
        {"text": f"row {i}", "auth_weight": a, "prov_entropy": e} for i, (a, e) in enumerate(rows)
    ])
    ex = data.load_split(path, tokenizer, _config(), lambda_weight=0.5)
    d = np.array([2.7 * (math.log(1 - a + 1e-8) + e) ** 2 for a, e in rows])
    expected = 1 + 0.5 * d / d.mean()
    np.testing.assert_allclose(ex.weights, expected, rtol=1e-6)
    # Low authority alone, or high provenance entropy alone, pulls harder than a trusted source.
    assert ex.weights[1] > ex.weights[0] and ex.weights[2] > ex.weights[0]
    plain = data.load_split(path, tokenizer, _config(), lambda_weight=0.0)
    assert np.all(plain.weights == 1.0)


def test_streaming_gives_the_same_examples_as_in_memory(tmp_path: Path, tokenizer,
                                                        corpus: Path) -> None:
    path = corpus / "train.jsonl"
    mem = data.load_split(path, tokenizer, _config(streaming="false"), 0.0)
    stream = data.load_split(path, tokenizer, _config(streaming="true"), 0.0)
    assert stream.streaming and not mem.streaming
    for i in (0, 17, len(mem) - 1):
        assert mem.get(i) == stream.get(i)


def test_val_jsonl_is_accepted_as_validation_file(tmp_path: Path) -> None:
    (tmp_path / "val.jsonl").write_text('{"text": "x"}\n')
    assert datafiles.find_valid_file(tmp_path) == tmp_path / "val.jsonl"
    (tmp_path / "valid.jsonl").write_text('{"text": "x"}\n')
    assert datafiles.find_valid_file(tmp_path) == tmp_path / "valid.jsonl"


def _cfg(training: dict | None = None, **top) -> cfg.Config:
    return cfg.resolve({"model": "m", "data": "d", "training": training or {}, **top})


# A chat template that knows tools, like real instruct models' (Qwen, Llama 3.1): it renders
# the top-level tools, assistant tool calls without content, and tool results with their id;
# an unknown role is an error raised by the template itself.
TOOLS_TEMPLATE = (
    "{%- if tools %}<s>tools: {{ tools | tojson }}</s>{% endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{ raise_exception('unknown role ' ~ m['role']) }}{%- endif -%}"
    "<s>{{ m['role'] }}{% if m['role'] == 'tool' %} [{{ m['tool_call_id'] }}]{% endif %}: "
    "{%- if m.get('content') %}{{ m['content'] }}{% endif -%}"
    "{%- for call in m.get('tool_calls') or [] %} call {{ call['function']['name'] }}"
    "({{ call['function']['arguments'] | tojson }}){% endfor -%}</s>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}<s>assistant: {% endif -%}"
)
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def tool_row(city: str) -> dict:
    """An OpenAI-style tool-calling conversation (as in OpenAI's fine-tuning guide)."""
    return {"messages": [
        {"role": "user", "content": f"weather in {city}?"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": city}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": f"it is sunny in {city}"},
    ], "tools": TOOLS}


@pytest.fixture(scope="module")
def tools_tokenizer(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    from mlx_lm.utils import load_tokenizer

    out = tmp_path_factory.mktemp("tools-tokenizer")
    (out / "tokenizer.json").write_bytes((tiny_model / "tokenizer.json").read_bytes())
    conf = json.loads((tiny_model / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**conf,
                                                           "chat_template": TOOLS_TEMPLATE}))
    return load_tokenizer(out)


@pytest.mark.parametrize("streaming", ["false", "true"])
@pytest.mark.parametrize("mask_prompt", [False, True])
def test_tool_calling_chat_rows_train_as_the_chat_template_tokenises_them(
        tmp_path: Path, tools_tokenizer, streaming: str, mask_prompt: bool) -> None:
    from mlx_lm.tuner.datasets import ChatDataset

    rows = [tool_row(c) for c in ("paris", "rome", "oslo")]
    rows.insert(1, {"messages": [{"role": "narrator", "content": "once upon a time"},
                                 {"role": "assistant", "content": "hi"}]})
    path = _write(tmp_path / "train.jsonl", rows)
    ex = data.load_split(path, tools_tokenizer, _cfg({"streaming": streaming},
                                                     mask_prompt=mask_prompt), 0.0)
    got = ex.fetch(range(len(ex)), count=True)
    reference = ChatDataset([], tools_tokenizer, mask_prompt=mask_prompt)  # mlx_lm's own
    assert [e for _, e in got] == [(*reference.process(r), 1.0) for r in rows if
                                   r["messages"][0]["role"] != "narrator"]
    text = tools_tokenizer.decode(got[0][1][0])
    assert "call get_weather" in text and "tool [call_1]:sunny" in text and '"city"' in text
    # The row the template rejects is skipped, counted and named by its line.
    s = ex.summary()
    assert s["malformed"] == 1 and s["examples"] == (4 if streaming == "true" else 3)
    assert s["first_problems"] == [
        "line 2: cannot be tokenised (TemplateError: unknown role narrator)"]


LONE_SURROGATE = '{"text": "the fox \\ud83e jumps"}'  # the JSON escape of half an emoji


def _surrogate_file(tmp_path: Path) -> Path:
    """24 lines; line 21 holds a lone surrogate; two earlier lines are not examples, so the
    example index (18) differs from the line number."""
    lines: list[object] = [{"text": f"the fox number {i} jumps over the dog"} for i in range(24)]
    lines[3] = ""
    lines[7] = "{not json"
    lines[20] = LONE_SURROGATE
    return _write(tmp_path / "train.jsonl", lines)


def test_a_row_the_tokenizer_rejects_is_a_skipped_line_when_loading(tmp_path: Path,
                                                                    tokenizer) -> None:
    ex = data.load_split(_surrogate_file(tmp_path), tokenizer, _cfg(), 0.0)
    s = ex.summary()
    assert (s["examples"], s["malformed"], s["blank"]) == (21, 2, 1)
    assert s["first_problems"][1] == (
        "line 21: cannot be tokenised: a string holds the lone UTF-16 surrogate \\ud83e, "
        "which is not valid Unicode text")
    assert 21 not in ex.index.lines.tolist() and len(ex.lengths) == 21


def test_streaming_skips_the_rejected_row_when_it_reads_it(tmp_path: Path, tokenizer) -> None:
    path = _surrogate_file(tmp_path)
    ex = data.load_split(path, tokenizer, _cfg({"streaming": "true"}), 0.0)
    assert ex.summary()["malformed"] == 1  # only the bad JSON is known at load
    got = ex.fetch(range(len(ex)), count=True)
    assert [int(ex.index.lines[i]) for i, _ in got] == [
        n for n in range(1, 25) if n not in (4, 8, 21)]
    s = ex.summary()
    assert s["malformed"] == 2 and s["first_problems"][1].startswith("line 21: cannot be "
                                                                     "tokenised: a string")
    with pytest.raises(DataError, match=r"train.jsonl:21: cannot be tokenised"):
        ex.get(int(np.flatnonzero(ex.index.lines == 21)[0]))
    # the same rows as in memory, token for token
    mem = data.load_split(path, tokenizer, _cfg(), 0.0)
    assert [e for _, e in got] == [mem.get(i) for i in range(len(mem))]


def test_truncation_is_counted_with_the_longest_length(tmp_path: Path, tokenizer) -> None:
    texts = [" ".join(["the fox jumps over the lazy dog"] * k) for k in (1, 2, 3, 5, 8, 1)]
    path = _write(tmp_path / "train.jsonl", [{"text": t} for t in texts])
    lengths = [len(tokenizer.encode(t)) + 1 for t in texts]  # mlx_lm appends EOS
    limit = 20
    expected = (sum(n > limit for n in lengths), max(lengths))
    assert expected[0] == 3  # the data is what the test means it to be
    mem = data.load_split(path, tokenizer, _cfg(max_seq_length=limit), 0.0)
    s = mem.summary()
    assert (s["truncated"], s["longest"], s["lengths_known"]) == (*expected, True)
    stream = data.load_split(path, tokenizer, _cfg({"streaming": "true"},
                                                   max_seq_length=limit), 0.0)
    assert stream.summary()["lengths_known"] is False  # nothing read yet
    stream.fetch(range(3), count=True)
    stream.fetch(range(3, 6), count=False)  # not counted (e.g. a later epoch)
    assert stream.summary()["examples_read"] == 3
    stream.fetch(range(3, 6), count=True)
    s = stream.summary()
    assert (s["truncated"], s["longest"], s["lengths_known"]) == (*expected, True)
    # a resumed run continues the counts of its checkpoint
    again = data.load_split(path, tokenizer, _cfg({"streaming": "true"},
                                                  max_seq_length=limit), 0.0)
    again.restore(s)
    assert again.summary()["truncated"] == expected[0]


def test_rows_whose_prompt_fills_max_seq_length_are_skipped_and_named(tmp_path: Path,
                                                                      tokenizer) -> None:
    long_prompt = " ".join(["the fox jumps over the lazy dog"] * 6)
    rows = [{"prompt": "the fox", "completion": f"jumps {i}"} for i in range(8)]
    rows[2] = rows[5] = {"prompt": long_prompt, "completion": "jumps"}
    path = _write(tmp_path / "train.jsonl", rows)
    c = _cfg(mask_prompt=True, max_seq_length=24)
    prompt_tokens = len(tokenizer.apply_chat_template(
        [{"role": "user", "content": long_prompt}], add_generation_prompt=True,
        return_dict=False))
    assert prompt_tokens >= 24
    mem = data.load_split(path, tokenizer, c, 0.0)
    s = mem.summary()
    assert (s["examples"], s["no_targets"], s["malformed"]) == (6, 2, 0)
    assert s["first_problems"][0].startswith(
        f"line 3: no target tokens: the prompt is {prompt_tokens} of ")
    assert s["first_problems"][1].startswith("line 6: no target tokens")
    stream = data.load_split(path, tokenizer, _cfg({"streaming": "true"}, mask_prompt=True,
                                                   max_seq_length=24), 0.0)
    kept = stream.fetch(range(8), count=True)
    assert [int(stream.index.lines[i]) for i, _ in kept] == [1, 2, 4, 5, 7, 8]
    assert stream.summary()["no_targets"] == 2
    # without mask_prompt the same rows train (their completion is cut, not their prompt)
    plain = data.load_split(path, tokenizer, _cfg(max_seq_length=24), 0.0)
    assert len(plain) == 8 and plain.summary()["truncated"] == 2


def test_a_file_of_mostly_unusable_rows_is_an_error(tmp_path: Path, tokenizer) -> None:
    rows = [{"prompt": " ".join(["the fox"] * 30), "completion": "x"}] * 6 + [
        {"prompt": "a", "completion": "b"}] * 4
    path = _write(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"train.jsonl: 6 of 10 lines are unusable"):
        data.load_split(path, tokenizer, _cfg(mask_prompt=True, max_seq_length=40), 0.0)


def test_describe_lines_joins_runs_and_caps_the_list() -> None:
    assert data.describe_lines(Path("d/train.jsonl"), [8, 3, 9, 10, 40]) == (
        "train.jsonl:3,8-10,40")
    assert data.describe_lines(Path("t.jsonl"), range(1, 200, 2), most=3) == (
        "t.jsonl:1,3,5 (+97 more lines)")


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_mask_prompt_on_text_data_names_the_key_and_the_format(tmp_path: Path, tokenizer,
                                                                streaming: str) -> None:
    """mlx_lm's own ValueError ("Prompt masking not supported for text dataset.") named
    neither the key nor what to do."""
    path = _write(tmp_path / "train.jsonl", [{"text": "the fox jumps"}] * 3)
    c = cfg.resolve({"model": "m", "data": "d", "mask_prompt": True,
                     "training": {"streaming": streaming}})
    with pytest.raises(DataError) as e:
        data.load_split(path, tokenizer, c, 0.0)
    assert str(e.value) == (
        f"{path}: mask_prompt: true needs a prompt, and this file is text data ('text' rows); "
        "use completions ('prompt'/'completion') or chat ('messages') rows, or set "
        "mask_prompt: false")
