"""--corpus files into documents (moe_common.corpus.split_documents): exact cases (issue 15, item 10)."""

import pytest

from moe_common.corpus import read_documents, split_documents, stdlib_documents, stdlib_text


def test_paragraphs_separated_by_blank_lines_are_documents():
    text = "First paragraph,\nwrapped   at 72 columns.\n\n\n  Second one.  \n   \nThird\n"
    assert split_documents(text) == ["First paragraph, wrapped at 72 columns.", "Second one.", "Third"]


def test_text_without_blank_lines_is_packed_in_order():
    lines = ["aaaa", "bb", "cccccc", "d", "ee"]  # 4, 2, 6, 1, 2 characters
    text = "\n".join(lines) + "\n"
    # Each document takes lines until it reaches 8 characters, counting the joining spaces.
    assert split_documents(text, doc_chars=8) == ["aaaa bb cccccc", "d ee"]
    assert split_documents(text, doc_chars=1) == lines
    assert split_documents(text, doc_chars=1000) == ["aaaa bb cccccc d ee"]


def test_a_single_paragraph_is_packed_like_a_file_without_blank_lines():
    assert split_documents("\n\nx y\nz\n\n", doc_chars=3) == ["x y", "z"]


def test_lines_format_is_one_document_per_line():
    assert split_documents("one  doc\n\n two \nthree\n", "lines") == ["one doc", "two", "three"]


def test_empty_and_bad_input():
    assert split_documents("") == [] and split_documents("\n \n\n") == [] and split_documents("", "lines") == []
    with pytest.raises(ValueError, match="corpus format"):
        split_documents("x", "json")
    with pytest.raises(ValueError, match="doc_chars"):
        split_documents("x", doc_chars=0)


def test_the_default_corpus_file_reads_back_as_its_documents(tmp_path):
    path = tmp_path / "text.txt"
    docs = stdlib_documents()
    # What `moe-predictor corpus` writes (stdlib_text), built from the same list: a second
    # stdlib_documents() call can see submodules the first one imported.
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    assert read_documents(path) == docs
    assert stdlib_text().count("\n\n") + 1 == len(split_documents(stdlib_text()))


def test_the_flags_reject_a_nonpositive_size():
    from predictor_service.cli import build_parser

    base = ["collect", "--model", "tiny", "--corpus", "c.txt", "--out", "t"]
    a = build_parser().parse_args([*base, "--corpus-format", "lines", "--corpus-doc-chars", "50"])
    assert (a.corpus_format, a.corpus_doc_chars) == ("lines", 50)
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--corpus-doc-chars", "0"])
