"""The terminal chat: one question (text or JSON), the interactive loop with follow-ups and
``/nuevo``, and a clear error for a missing adapter."""

from __future__ import annotations

import io
import json

import pytest

from gemma_cse.chat import main
from gemma_cse.cli import run
from gemma_cse.data import load_entries

LOST_CARD = "¿Cómo repongo mi credencial si la perdí?"
FOLLOW_UP = "¿y cuánto cuesta?"  # three words: read with the previous question


def replies(out: str) -> list[str]:
    """The status line of each reply: ``[answered · fuente: <entry id> (score) …]``."""
    return [line for line in out.splitlines() if line.startswith("[")]


def test_one_question_as_json_is_the_typed_reply_with_its_source(capsys):
    assert run(main, ["--mode", "retrieval", "--question", LOST_CARD, "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["status"] == "answered"
    source = reply["sources"][0]
    assert source["topic"] == "credencial_reposicion_extravio"
    assert reply["text"] == next(e.answer for e in load_entries() if e.id == source["entry_id"])


def test_one_question_as_text_ends_with_status_and_source(capsys):
    question = "¿Cuál es la capital de Australia?"
    assert run(main, ["--mode", "retrieval", "--question", question]) == 0
    out = capsys.readouterr().out
    assert replies(out) == ["[out_of_scope]"]  # no source offered for a refusal
    assert "Coordinación de Sistemas Escolares" in out


def test_an_empty_question_is_answered_once_not_a_session(capsys):
    assert run(main, ["--mode", "retrieval", "--question", "", "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["status"] == "chitchat" and reply["guard_reason"] == "empty"


def test_interactive_follow_up_uses_the_history_until_nuevo(monkeypatch, capsys):
    session = f"{LOST_CARD}\n{FOLLOW_UP}\n\n/nuevo\n{FOLLOW_UP}\n/salir\nnever asked\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(session))
    assert run(main, ["--mode", "retrieval"]) == 0
    lines = replies(capsys.readouterr().out)
    assert len(lines) == 3  # the empty line is skipped, nothing after /salir is asked
    assert "credencial_reposicion_extravio" in lines[0]
    assert "fuente: credencial_" in lines[1]  # "how much" about the card asked just before
    assert "fuente: credencial_" not in lines[2]  # after /nuevo: "how much" alone


def test_interactive_session_ends_cleanly_at_end_of_input(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{LOST_CARD}\n"))
    assert run(main, ["--mode", "retrieval"]) == 0
    assert len(replies(capsys.readouterr().out)) == 1


def test_missing_adapter_is_one_clear_error_before_any_slow_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("GEMMA_CSE_CACHE", str(tmp_path / "cache"))
    assert run(main, ["--adapter", str(tmp_path), "--question", LOST_CARD]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}: no adapter.lora.h5")
    assert "--adapter none" in err
    assert not (tmp_path / "cache").exists()  # no index was built, no guard calibrated


def test_rag_lora_without_an_adapter_is_one_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("GEMMA_CSE_CACHE", str(tmp_path / "cache"))
    assert run(main, ["--adapter", "none", "--question", LOST_CARD]) == 2
    assert capsys.readouterr().err == (
        "error: mode rag_lora needs an adapter; for the base model use mode rag\n"
    )
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--mode", "nonsense"],
        ["--max-new-tokens", "many"],
        ["--max-new-tokens", "0"],
        ["--temperature", "-0.5"],
        ["--json"],  # JSON is for one question
    ],
)
def test_bad_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "usage: python -m gemma_cse.chat" in capsys.readouterr().err
