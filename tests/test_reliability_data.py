"""Data files in-process: what check_file accepts (so the checks refuse only what is really bad),
Arrow files read, and the map-style and streaming readers agreeing on bad rows. The refusals
themselves go through the CLI in test_reliability_corpus.py."""

from __future__ import annotations

import codecs
import json

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from finetune.data import sources
from finetune.data.stream_sources import LocalReader
from finetune.errors import DataError

ROW = {"instruction": "Say hi", "output": "hi"}


def _rows(recs) -> list[dict]:
    return [r.row for r in recs]


def test_utf8_with_bom_crlf_and_u2028_inside_strings_are_read(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    line = json.dumps({"instruction": "a\u2028b", "output": "c"}, ensure_ascii=False)
    jsonl.write_bytes(codecs.BOM_UTF8 + (json.dumps(ROW) + "\r\n" + line + "\r\n").encode())
    assert _rows(sources.read_local(sources.resolve_files(str(jsonl)))) == [
        ROW, {"instruction": "a\u2028b", "output": "c"}]
    assert _rows(LocalReader(str(jsonl), "text")) == _rows(sources.read_local([jsonl]))
    csv_file = tmp_path / "a.csv"
    csv_file.write_bytes(codecs.BOM_UTF8 + b"instruction,output\r\nSay hi,hi\r\n")
    assert _rows(sources.read_local(sources.resolve_files(str(csv_file)))) == [ROW]


def test_non_ascii_utf8_split_at_the_head_boundary_is_fine(tmp_path):
    """check_file reads the first 64 KiB: a multi-byte character cut there is not an error."""
    f = tmp_path / "a.jsonl"
    pad = "x" * (sources.HEAD_BYTES - len('{"instruction": "') - 1)
    f.write_text(json.dumps({"instruction": pad + "é€", "output": "o"}, ensure_ascii=False) + "\n")
    sources.check_file(f)
    assert len(list(sources.read_local([f]))) == 1


@pytest.mark.parametrize("fmt", ["stream", "file"])
def test_arrow_ipc_files_are_read(tmp_path, fmt):
    table = pa.table({"instruction": ["a", "b"], "output": ["c", "d"]})
    f = tmp_path / "d.arrow"
    with pa.OSFile(str(f), "wb") as sink:
        new = ipc.new_stream if fmt == "stream" else ipc.new_file
        with new(sink, table.schema) as writer:
            writer.write_table(table)
    recs = list(sources.read_local(sources.resolve_files(str(f))))
    assert _rows(recs) == table.to_pylist() and recs[1].origin == f"{f}#row1"
    assert _rows(LocalReader(str(f), "text")) == table.to_pylist()


def test_a_save_to_disk_dir_reads_its_arrow_shards_not_its_metadata(tmp_path):
    import datasets

    datasets.Dataset.from_list([ROW, ROW]).save_to_disk(str(tmp_path / "ds"))
    files = sources.resolve_files(str(tmp_path / "ds"))
    assert files and all(f.suffix == ".arrow" for f in files)
    assert _rows(sources.read_local(files)) == [ROW, ROW]


def test_a_bad_utf8_line_is_a_bad_row_on_both_paths(tmp_path):
    """Past the checked head, one bad line is one bad row (skippable), at the same line number
    for the map-style and streaming readers."""
    f = tmp_path / "a.jsonl"
    good = (json.dumps(ROW) + "\n") * 2000
    f.write_bytes(good.encode() + b'{"instruction": "caf\xe9", "output": "x"}\n' + good.encode())
    sources.check_file(f)  # the head is fine
    for rows in (list(sources.read_local([f])), list(LocalReader(str(f), "text"))):
        bad = [r for r in rows if "__error__" in r.row]
        assert [r.origin for r in bad] == [f"{f}:2001"]
        assert bad[0].row["__error__"] == "not UTF-8 text (byte 0xe9 at column 21)"
        assert len(rows) == 4001


def test_a_file_that_changes_after_the_check_is_still_one_line(tmp_path):
    """Damage read later (a Parquet footer) is turned into a DataError by ``reading``."""
    f = tmp_path / "d.parquet"
    f.write_bytes(b"PAR1" + b"\x00" * 100 + b"PAR1")
    sources.check_file(f)  # magic numbers fine
    with pytest.raises(DataError) as err:
        list(sources.read_local([f]))
    assert str(err.value).startswith(f"{f}: cannot be read as a Parquet file (")
    assert "\n" not in str(err.value)
