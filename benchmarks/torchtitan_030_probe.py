"""Does torchtitan 0.3.0 run here? A probe, the first step towards a side-by-side with it (issue 5).

    python3 benchmarks/torchtitan_030_probe.py --site /tmp/site030 --out probe.json

Issue 5 asks to try torchtitan 0.3.0 beside 0.2.2 where it runs on the GPU machine's torch (2.11).
0.3.0 is not a drop-in peer: it left TOML for Python config functions (`--module llama3 --config
llama3_debugmodel`), its language models no longer take SDPA attention (flex, flex_flash or varlen
only: "sdpa is no longer supported for language models"), it fuses wq/wk/wv into one projection
and wraps the step in CUDA graphs by default. Its README asks for a nightly torch. So before any
harness is built for it, this probe answers, on the machine at hand:

1. does `torchtitan.train` import (with the wheels of `tools/fetch_gpu_wheels.sh --peer` in --site)?
2. does its llama3 debug model build and initialize on the device?
3. does it train: forward, backward and an AdamW step on random tokens, three times (on CPU only
   the forward: FlexAttention has no CPU backward)?

Each answer, with the exception's last line where one failed, goes to --out as JSON and to stdout.
The probe exits 0 whatever the answers (they are the result); 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def _failure(e: BaseException) -> str:
    last = traceback.format_exception_only(type(e), e)[-1].strip()
    return last[:500]


def probe(site: Path, *, steps: int = 3) -> dict[str, Any]:
    """Import, build and train torchtitan's llama3 debug model from `site`; what worked and what did not."""
    sys.path.insert(0, str(site))  # before any torchtitan import: a 0.2.2 on PYTHONPATH must not win
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict[str, Any] = {"site": str(site), "torch": torch.__version__, "device": device.type,
                           "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    try:
        import torchtitan
        import torchtitan.train  # noqa: F401  (the trainer and everything it imports)

        out["torchtitan"] = torchtitan.__version__
        out["torchtitan_file"] = torchtitan.__file__
        out["imports"] = True
    except BaseException as e:  # noqa: BLE001  (an import may fail in any way; that is the answer)
        out.update(imports=False, error=_failure(e))
        return out
    if not str(out["torchtitan_file"]).startswith(str(site)):
        out.update(imports=False, error=f"torchtitan was imported from {out['torchtitan_file']}, not from {site}")
        return out

    # Whether its language models still take SDPA (0.3.0 refuses it with a ValueError): True, False, or None
    # where the question could not be asked.
    try:
        from torchtitan.models.common.config_utils import get_attention_config

        get_attention_config("sdpa")
        out["sdpa_attention"] = True
    except ValueError as e:
        out.update(sdpa_attention=False, sdpa_refusal=_failure(e))
    except Exception as e:  # noqa: BLE001
        out.update(sdpa_attention=None, sdpa_check=_failure(e))

    try:
        from torchtitan.models.llama3 import model_registry

        spec = model_registry("debugmodel")
        with torch.device(device):
            model = spec.model.build()
            model.init_states()
        out["builds"] = True
        out["params"] = sum(p.numel() for p in model.parameters())
    except Exception as e:  # noqa: BLE001
        out.update(builds=False, error=_failure(e))
        return out

    bs, seq = 2, 256
    train = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if train else None
    times, losses = [], []
    try:
        for _ in range(steps if train else 1):
            tokens = torch.randint(0, spec.model.vocab_size, (bs, seq + 1), device=device)
            positions = torch.arange(seq, device=device).repeat(bs, 1)
            t0 = time.perf_counter()
            with torch.set_grad_enabled(train):
                logits = model(tokens[:, :-1], positions, model.get_attention_masks(positions))
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            if train:
                assert opt is not None
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(float(loss))
        out.update(trains=train, forward=True, step_s=times, losses=losses)
    except Exception as e:  # noqa: BLE001
        out.update(trains=False, error=_failure(e))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--site", required=True, help="folder the torchtitan 0.3.0 wheels were installed into (--target)")
    p.add_argument("--out", required=True, help="JSON file for the answers")
    p.add_argument("--steps", type=int, default=3, help="training steps on a GPU (default 3)")
    a = p.parse_args(argv)
    site = Path(a.site).resolve()
    if not (site / "torchtitan").is_dir():
        result: dict[str, Any] = {"site": str(site), "imports": False,
                                  "error": f"no torchtitan package in {site} (tools/fetch_gpu_wheels.sh --peer fetches "
                                           "0.3.0 into .whl/peer030; install it with pip --target)"}
    else:
        result = probe(site, steps=a.steps)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    if result.get("trains"):
        verdict = "runs (forward, backward, AdamW)"
    elif result.get("forward"):
        verdict = "its forward runs (no backward on CPU)"
    else:
        verdict = "does not run"
    verdict += f": {result['error']}" if "error" in result else ""
    print(f"torchtitan {result.get('torchtitan', '0.3.0')} on torch {result.get('torch', '?')} "
          f"({result.get('device_name', '?')}): {verdict}")
    if result.get("sdpa_attention") is False:
        print(f"  its llama3 takes no SDPA attention: {result['sdpa_refusal']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
