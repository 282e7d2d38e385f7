"""Environments: episodes of several turns, where the policy acts, the environment (or a tool) answers, until done.

An environment is any object with two methods (``Environment``), named by class path in a config
(``PPOModule(environment=...)``) and built once per episode with no arguments:

- ``reset(record)``: the first observation, the prompt as text or chat messages, from a prompt record (its fields:
  ``{"prompt": ...}`` and whatever else the record holds);
- ``step(response)``: given the policy's turn as text (special tokens removed), a ``Step``: the next observation
  (text, or chat messages such as ``{"role": "tool", "content": ...}``; ``None`` when done), the turn's reward, and
  whether the episode is done. An episode's reward is the sum of its steps' rewards.

``ToolEnvironment`` is the usual case: tools are plain typed Python functions with Google docstrings; their JSON
schemas (``tool_schemas``, transformers' ``get_json_schema``) go to the chat template (``tools=``). A turn that calls
tools gets their results back as ``tool`` messages; a turn that calls none is the answer, scored by ``score``. A call
is written in the policy's turn as Hermes / Qwen2.5 chat templates render one, which is also the plain-text format
for templates without their own::

    <tool_call>{"name": "reverse", "arguments": {"text": "abc"}}</tool_call>

(``"parameters"`` is accepted for ``"arguments"``, as Llama 3.1 writes it). A call that does not parse, names no known
tool, has wrong arguments, or whose tool raises becomes an error observation the policy sees (``"error: ..."``), and
is counted in ``Step.tool_errors``: it never ends the run.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

Message = dict[str, Any]
Observation = str | list[Message]

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class Step:
    """What the environment answers to one turn of the policy.

    Attributes:
        observation: the next observation, text or chat messages; ``None`` once done.
        reward: this turn's reward (the episode's is the sum over its turns).
        done: the episode ended.
        tool_calls, tool_errors: the tool calls this turn made, and how many of them failed (counted, never raised).
    """

    observation: Observation | None = None
    reward: float = 0.0
    done: bool = False
    tool_calls: int = 0
    tool_errors: int = 0


class Environment(Protocol):
    def reset(self, record: Mapping[str, Any]) -> Observation: ...

    def step(self, response: str) -> Step: ...


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


def parse_tool_calls(text: str) -> list[ToolCall | str]:
    """Each ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` of ``text``, in order; a call that does not
    parse is the error message saying why, in its place."""
    calls: list[ToolCall | str] = []
    for body in TOOL_CALL.findall(text):
        try:
            call = json.loads(body)
        except json.JSONDecodeError as err:
            calls.append(f"the tool call is not JSON ({err.msg}): {body.strip()!r}")
            continue
        arguments = call.get("arguments", call.get("parameters", {})) if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(arguments, dict):
            calls.append(f'a tool call is {{"name": str, "arguments": {{...}}}}, not {body.strip()!r}')
            continue
        calls.append(ToolCall(call["name"], arguments))
    if not calls and "<tool_call>" in text:  # opened and never closed
        calls.append(f"the tool call is not closed with </tool_call>: {text[text.index('<tool_call>') :]!r}")
    return calls


def run_tool(tools: Mapping[str, Callable[..., Any]], call: ToolCall | str) -> tuple[str, bool]:
    """``(result, failed)``: the tool's result as text, or ``"error: ..."`` and ``True`` when the call did not parse,
    names no tool of ``tools``, or the tool raised (with its arguments wrong, too)."""
    if isinstance(call, str):
        return f"error: {call}", True
    if call.name not in tools:
        return f"error: no tool named {call.name!r}; the tools are {sorted(tools)}", True
    try:
        result = tools[call.name](**call.arguments)
    except Exception as err:  # the policy sees what went wrong, as it would from a real tool
        return f"error: {call.name} raised {type(err).__name__}: {err}", True
    return result if isinstance(result, str) else json.dumps(result), False


def tool_schemas(tools: Sequence[Callable[..., Any]]) -> list[dict[str, Any]]:
    """The JSON schema of each tool, as chat templates take them (``tools=``): from its type hints and Google
    docstring (transformers' ``get_json_schema``, which says what is missing)."""
    from transformers.utils import get_json_schema

    return [get_json_schema(tool) for tool in tools]


class ToolEnvironment:
    """An environment whose turns either call ``tools`` or answer; subclasses define ``reset`` and ``score``.

    ``step`` runs every call of a turn (``parse_tool_calls``) and answers with one ``tool`` message per call; a turn
    without calls is the answer: the episode ends with ``score(answer)``. Attributes of a subclass: ``tools``, the
    functions.
    """

    tools: Sequence[Callable[..., Any]] = ()

    def reset(self, record: Mapping[str, Any]) -> Observation:
        raise NotImplementedError

    def score(self, answer: str) -> float:
        raise NotImplementedError

    def step(self, response: str) -> Step:
        calls = parse_tool_calls(response)
        if not calls:
            return Step(reward=float(self.score(response)), done=True)
        tools = {tool.__name__: tool for tool in self.tools}
        results = [run_tool(tools, call) for call in calls]
        messages = [{"role": "tool", "content": result} for result, _ in results]
        return Step(observation=messages, tool_calls=len(calls), tool_errors=sum(failed for _, failed in results))


def import_environment(path: str) -> type:
    """The environment class at import path ``path`` (``package.module.Class``), checked to have ``reset`` and
    ``step``. It runs the code it names: name only code you trust."""
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"environment={path!r}: give the class's import path, e.g. lightning_rlhf.toy.ToolEnv")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"environment={path!r} cannot be imported: {err}") from None
    missing = [method for method in ("reset", "step") if not callable(getattr(cls, method, None))]
    if missing:
        raise ValueError(f"environment={path!r} has no {' or '.join(missing)}() (see lightning_rlhf.environments)")
    return cls
