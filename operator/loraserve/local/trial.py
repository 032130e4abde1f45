"""What `loraserve local up` shows a new user once the stack runs: the CLI commands of the README's quick start
(run for real, printed as typed), then a working `curl` and `openai` snippet. Pure: text only, no I/O.

The commands use shell variables so that the README can show them verbatim: `$MODEL` (the base model
directory), `$ADAPTER` (the adapter directory); `up` prints their `export` lines first.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

DEPLOYMENT = "demo"
# vLLM for CPU: a short context keeps the KV cache small; float32 as the demo model was trained.
VLLM_ARGS = ("--extra-arg=--max-model-len=512", "--extra-arg=--dtype=float32")


@dataclass(frozen=True)
class Trial:
    model: Path
    adapters: dict[str, Path]
    question: str
    router_url: str
    kubeconfig: Path
    bin_dir: Path

    @property
    def base_name(self) -> str:
        return self.model.name

    @property
    def addon(self) -> str:
        return next(iter(self.adapters))

    def env(self) -> dict[str, str]:
        """The shell variables the commands use."""
        env = {"KUBECONFIG": str(self.kubeconfig), "MODEL": str(self.model)}
        if self.adapters:
            env["ADAPTER"] = str(self.adapters[self.addon])
        return env


def commands(addons: list[str]) -> list[str]:
    """The quick start's commands, as the README shows them (first addon's directory is `$ADAPTER`)."""
    out = [
        f"loraserve create deployment file://$MODEL --id {DEPLOYMENT} --enable-addons --min-replica-count 1 "
        + " ".join(VLLM_ARGS)
        + " --wait",
    ]
    for i, addon in enumerate(addons):
        adapter = "$ADAPTER" if i == 0 else f"$ADAPTER_{i}"
        out.append(f"loraserve create model-version {addon}-v1 --base file://$MODEL --adapter {adapter}")
        out.append(f"loraserve load-lora {addon}-v1 --deployment {DEPLOYMENT} --wait")
    out.append("loraserve list deployments")
    return out


def expand(command: str, env: dict[str, str]) -> list[str]:
    """argv of a command, its `$VARS` replaced (as the shell would, for the variables `env()` names)."""
    for name in sorted(env, key=len, reverse=True):
        command = command.replace(f"${name}", shlex.quote(env[name]))
    return shlex.split(command)


def exports(trial: Trial) -> list[str]:
    env = trial.env()
    for i, addon in enumerate(list(trial.adapters)[1:], 1):
        env[f"ADAPTER_{i}"] = str(trial.adapters[addon])
    return [f"export {k}={shlex.quote(v)}" for k, v in env.items()]


def curl_snippet(trial: Trial, model: str) -> str:
    body = (
        '{"model": "' + model + '", "messages": [{"role": "user", "content": "' + trial.question + '"}], '
        '"max_tokens": 40, "temperature": 0}'
    )
    return (
        f"curl -s {trial.router_url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f"    -d {shlex.quote(body)}"
    )


def python_snippet(trial: Trial, model: str) -> str:
    return "\n".join(
        [
            "from openai import OpenAI",
            f'client = OpenAI(base_url="{trial.router_url}/v1", api_key="none")',
            "answer = client.chat.completions.create(",
            f'    model="{model}", messages=[{{"role": "user", "content": "{trial.question}"}}],',
            "    max_tokens=40, temperature=0,",
            ")",
            "print(answer.choices[0].message.content)",
        ]
    )
