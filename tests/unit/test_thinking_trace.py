"""Native thinking traces split out of generated text, whole or streamed in any pieces."""

from hypothesis import given, settings
from hypothesis import strategies as st

from services.reasoning.thinking import (
    CONTENT,
    REASONING,
    TraceMarkers,
    TraceSplitter,
    markers_in_template,
    split_trace,
)

M = TraceMarkers()


def test_a_trace_then_an_answer():
    assert split_trace("<think>2+3 is 5</think>\nFinal answer: 5", M) == ("2+3 is 5", "\nFinal answer: 5")


def test_a_template_that_opens_the_trace_leaves_the_output_inside_it():
    assert split_trace("hmm, 5.</think>5", M, inside=True) == ("hmm, 5.", "5")
    assert split_trace("still thinking", M, inside=True) == ("still thinking", "")  # never closed


def test_no_markers_is_all_answer_and_lookalikes_stay_text():
    assert split_trace("5 < 6 and <thin>", M) == ("", "5 < 6 and <thin>")
    assert split_trace("a <thinker>", M) == ("", "a <thinker>")


def test_markers_split_across_stream_pieces():
    s = TraceSplitter(M)
    got = []
    for piece in ["<th", "ink>abc</", "thi", "nk>ans", "wer"]:
        got += s.feed(piece)
    got += s.flush()
    assert got == [(REASONING, "abc"), (CONTENT, "ans"), (CONTENT, "wer")]


def test_custom_markers_and_template_detection():
    m = TraceMarkers(start="<|thought|>", end="<|/thought|>")
    assert split_trace("<|thought|>x<|/thought|>y", m) == ("x", "y")
    assert markers_in_template("{{ '<think>' }}...{{ '</think>' }}") == M
    assert markers_in_template("{{ messages }}") is None and markers_in_template(None) is None


PIECES = st.lists(st.sampled_from(["<think>", "</think>", "<", "th", "ink>", "/", "a b", "5", "\n"]))


@settings(max_examples=300, derandomize=True)
@given(pieces=PIECES, cuts=st.lists(st.integers(0, 200), max_size=8), inside=st.booleans())
def test_streaming_in_any_pieces_splits_as_the_whole_does(pieces, cuts, inside):
    text = "".join(pieces)
    whole = split_trace(text, M, inside)
    points = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    s = TraceSplitter(M, inside)
    parts = [p for c in chunks for p in s.feed(c)] + s.flush()
    streamed = (
        "".join(t for k, t in parts if k == REASONING),
        "".join(t for k, t in parts if k == CONTENT),
    )
    assert streamed == whole
    assert len(whole[0]) + len(whole[1]) <= len(text)  # markers go to neither side


# ChatML that thinks: history keeps only what follows a trace; the generation prompt opens one.
THINKING_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}{{ m['content'].split('</think>')[-1] }}"
    "{% else %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
)


def test_a_thinking_chat_template_is_detected_and_known_to_open_the_trace(tmp_path):
    """With the real tokenizer of the default model (installed before the suite runs)."""
    import shutil

    from cluster.models import model_path
    from services.loop.tokenizer import HfTokenizer

    src = model_path("smollm2-135m-instruct")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    tok = HfTokenizer(str(tmp_path))
    markers = markers_in_template(tok.chat_template)
    assert markers == M and tok.opens(markers.start)
    plain = HfTokenizer(str(src))
    assert markers_in_template(plain.chat_template) is None and not plain.opens("<think>")
