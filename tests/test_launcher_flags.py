"""moe-serve passes every gateway, expert-server and predictor flag through (issue 15, item 4).

Parity by comparing the parsers: each child flag is either forwarded (gateway/launcher.py's
GATEWAY_FLAGS, EXPERT_FLAGS, PREDICTOR_SERVE_FLAGS) or listed below with the reason a stack
sets it itself. Then every forwarded flag, given a non-default value on moe-serve, is parsed
back by the child's own parser to that value.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from expert_server.server import build_parser as expert_parser
from gateway import launcher
from gateway.server import build_parser as gateway_parser
from predictor_service.cli import build_parser as predictor_parser

TLS = ["--tls-cert", "--tls-key", "--tls-ca", "--tls-require-client-cert", "--cluster-token-file", "--allowed-peers",
       "--insecure"]
# child flag -> why moe-serve does not forward a flag of that name as given.
SET_BY_THE_STACK = {
    "--help": "each process's own",
    "--model": "moe-serve --model, resolved once and given to every child as a path",
    "--cache-dir": "moe-serve --cache-dir: the launcher builds presets once, children get the path",
    "--port": "picked per process (the gateway's is moe-serve --port)",
    "--host": "moe-serve --host for the gateway, --internal-host for expert servers and the predictor",
    "--metrics-port": "moe-serve --metrics-port BASE: BASE, BASE+1, BASE+2+i per process",
    **{f: "moe-serve's own TLS and cluster flags, given to every process" for f in TLS},
}
GATEWAY_EXCLUDED = {
    **SET_BY_THE_STACK,
    "--expert-servers": "the addresses of the servers the stack started (moe-serve --expert-servers is their count)",
    "--expert-discovery": "the stack starts its expert servers at known addresses",
    "--admin-port": "moe-serve --admin-port, given by start_stack",
    "--admin-host": "a stack's admin port binds loopback: only the launcher registers servers",
    "--predictor": "the address of the stack's own predictor (--no-predictor: none)",
    "--device": "moe-serve --gateway-device (default: cuda when --device is cuda)",
}
EXPERT_EXCLUDED = {
    **SET_BY_THE_STACK,
    "--threads": "moe-serve --expert-threads (default: the cores split between the servers)",
    "--experts": "the gateway assigns each server its home experts",
    "--shard": "the gateway assigns each server its home experts",
    "--register-with": "set by the launcher for servers it adds or restarts (the gateway's admin address)",
    "--advertise": "a stack's servers are called at the address they bind",
}
PREDICTOR_EXCLUDED = {
    **SET_BY_THE_STACK,
    "--checkpoint": "moe-serve --predictor-checkpoint",
    "--log-level": "before `serve`: launcher.predictor_argv",
    "--log-format": "before `serve`: launcher.predictor_argv",
}


def _serve_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


CHILDREN = [
    ("gateway", gateway_parser(), launcher.GATEWAY_FLAGS, GATEWAY_EXCLUDED),
    ("expert server", expert_parser(), launcher.EXPERT_FLAGS, EXPERT_EXCLUDED),
    ("predictor serve", _serve_parser(predictor_parser()), launcher.PREDICTOR_SERVE_FLAGS, PREDICTOR_EXCLUDED),
]


@pytest.mark.parametrize("name,child,forwarded,excluded", CHILDREN, ids=[c[0] for c in CHILDREN])
def test_every_child_flag_is_forwarded_or_excluded_with_a_reason(name, child, forwarded, excluded):
    ours = launcher.build_parser()._option_string_actions
    theirs = {f for f in child._option_string_actions if f.startswith("--")}
    missing = sorted(theirs - set(forwarded.values()) - set(excluded))
    assert not missing, f"{name} flags moe-serve cannot pass through: {missing}"
    assert not set(forwarded.values()) & set(excluded), "a flag is both forwarded and excluded"
    assert not set(forwarded.values()) - theirs, f"forwarded to {name} but not its flags"
    assert not set(forwarded) - set(ours), "forwarded flags that moe-serve does not have"


@pytest.mark.parametrize("name,child,forwarded,excluded", CHILDREN, ids=[c[0] for c in CHILDREN])
def test_forwarded_flags_have_the_childs_defaults_and_choices(name, child, forwarded, excluded):
    ours = launcher.build_parser()._option_string_actions
    for flag, child_flag in forwarded.items():
        mine, theirs = ours[flag], child._option_string_actions[child_flag]
        assert mine.default == theirs.default, f"{flag}: moe-serve {mine.default!r}, {name} {theirs.default!r}"
        assert mine.choices == theirs.choices or (mine.choices and theirs.choices
                                                  and list(mine.choices) == list(theirs.choices)), flag
        assert type(mine) is type(theirs), flag


# Values for forwarded flags that are free-form strings (the rest are derived from type and choices).
STRINGS = {"--log-level": "DEBUG", "--model-name": "my-switch", "--device": "cuda:1", "--replica-memory": "1GB", "--expert-dtype": "bfloat16"}


def _non_default_argv(flags) -> list[str]:
    actions = launcher.build_parser()._option_string_actions
    argv = []
    for flag in flags:
        action = actions[flag]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            argv.append(flag)
        elif action.choices:
            argv += [flag, next(str(c) for c in action.choices if c != action.default)]
        elif action.type is int:
            argv += [flag, str(action.default + 3)]
        elif action.type is float:
            argv += [flag, str(action.default + 0.25)]
        elif action.type is Path:
            argv += [flag, f"/tmp/{flag.strip('-')}"]
        else:
            argv += [flag, STRINGS[flag]]
    return argv


def test_every_forwarded_flag_reaches_its_child_with_its_value():
    flags = {**launcher.GATEWAY_FLAGS, **launcher.EXPERT_FLAGS, **launcher.PREDICTOR_SERVE_FLAGS}
    a = launcher.parse_args(["--model", "tiny", *_non_default_argv(flags)])
    ours = launcher.build_parser()._option_string_actions
    gateway = gateway_parser().parse_args(["--model", "tiny", *launcher.gateway_argv(a)])
    expert = expert_parser().parse_args(["--model", "tiny", *launcher.expert_argv(a, 3)])
    predictor = predictor_parser().parse_args([*launcher.predictor_argv(a), "serve",
                                               *launcher.forward(a, launcher.PREDICTOR_SERVE_FLAGS)])
    for parsed, child, forwarded in [(gateway, CHILDREN[0][1], launcher.GATEWAY_FLAGS),
                                     (expert, CHILDREN[1][1], launcher.EXPERT_FLAGS),
                                     (predictor, CHILDREN[2][1], launcher.PREDICTOR_SERVE_FLAGS)]:
        for flag, child_flag in forwarded.items():
            mine = getattr(a, ours[flag].dest)
            theirs = getattr(parsed, child._option_string_actions[child_flag].dest)
            assert mine != ours[flag].default, f"{flag}: the test gave it its default"
            assert theirs == mine, f"{flag} -> {child_flag}: {theirs!r}, not {mine!r}"
    assert expert.threads == 3
    assert (predictor.log_level, predictor.log_format) == ("DEBUG", a.log_format)


def test_the_readme_examples_parse():
    """The issue's two commands that answered 'unrecognized arguments'."""
    a = launcher.parse_args(["--model", "tiny", "--max-input-tokens", "1024", "--record-traces", "traces/"])
    assert gateway_parser().parse_args(["--model", "tiny", *launcher.gateway_argv(a)]).max_input_tokens == 1024
    argv = launcher.gateway_argv(a)
    assert argv[argv.index("--record-traces") + 1] == "traces"


# ---- what --predictor-checkpoint and --replication imply (issue 15, item 2) ----

def test_a_checkpoint_implies_predictive_replication_with_replica_memory():
    a = launcher.parse_args(["--model", "tiny", "--predictor-checkpoint", "f.pt"])
    assert (a.replication, a.replica_memory) == ("predictive", launcher.DEFAULT_REPLICA_MEMORY)
    assert a.implied == ["--replication predictive (implied by --predictor-checkpoint)",
                         f"--replica-memory {launcher.DEFAULT_REPLICA_MEMORY} (replication predictive needs room for replicas)"]
    gateway = gateway_parser().parse_args(["--model", "tiny", *launcher.gateway_argv(a)])
    expert = expert_parser().parse_args(["--model", "tiny", *launcher.expert_argv(a, 1)])
    assert (gateway.replication, expert.replica_memory) == ("predictive", launcher.DEFAULT_REPLICA_MEMORY)


def test_what_the_user_sets_wins_over_what_is_implied(tmp_path):
    a = launcher.parse_args(["--model", "tiny", "--predictor-checkpoint", "f.pt", "--replication", "off"])
    assert (a.replication, a.replica_memory, a.implied) == ("off", "0", [])
    a = launcher.parse_args(["--model", "tiny", "--predictor-checkpoint", "f.pt", "--replica-memory", "1GB"])
    assert (a.replication, a.replica_memory) == ("predictive", "1GB")
    a = launcher.parse_args(["--model", "tiny", "--replication", "window"])
    assert (a.replication, a.replica_memory) == ("window", launcher.DEFAULT_REPLICA_MEMORY)
    config = tmp_path / "stack.yaml"
    config.write_text("model: tiny\npredictor-checkpoint: f.pt\nreplication: reactive\nreplica-memory: 0\n")
    a = launcher.parse_args(["--config", str(config)])
    assert (a.replication, a.replica_memory, a.implied) == ("reactive", 0, [])


def test_without_a_checkpoint_nothing_is_implied():
    a = launcher.parse_args(["--model", "tiny"])
    assert (a.replication, a.replica_memory, a.implied) == ("off", "0", [])
    a = launcher.parse_args(["--model", "tiny", "--predictor-checkpoint", "f.pt", "--no-predictor"])
    assert (a.replication, a.implied) == ("off", [])
