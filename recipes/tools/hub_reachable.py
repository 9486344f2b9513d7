"""Exit 0 when the Hugging Face hub answers within a few seconds, 1 otherwise (offline).

    python recipes/tools/hub_reachable.py [DATASET] [--timeout 4]

``datasets`` retries an unreachable hub for about 24 seconds before failing unless
``HF_HUB_OFFLINE=1``/``HF_DATASETS_OFFLINE=1`` is set, so the quick start asks here first. Those
variables make this answer "offline" at once; otherwise one HEAD request goes to
``$HF_ENDPOINT/api/datasets/DATASET`` (proxy variables apply), and a name lookup that hangs is
cut off by the same timeout.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import urllib.error
import urllib.request

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_reachable(dataset: str, timeout: float) -> tuple[bool, str]:
    """Whether the hub serves ``dataset``'s metadata within ``timeout`` seconds, and why not."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return False, f"{name} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/api/datasets/{dataset}"
    answer: list[tuple[bool, str]] = []

    def ask() -> None:
        try:
            request = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer.append((response.status < 400, f"HTTP {response.status}"))
        except urllib.error.HTTPError as error:
            answer.append((False, f"HTTP {error.code} from {url}"))
        except (OSError, ValueError) as error:
            answer.append((False, f"{url}: {error}"))

    # getaddrinfo ignores socket timeouts, so the whole request runs on a thread we stop waiting for
    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout)
    return answer[0] if answer else (False, f"{url}: no answer in {timeout:g} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", nargs="?", default="bentrevett/multi30k")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds")
    args = parser.parse_args(argv)
    reachable, reason = hub_reachable(args.dataset, args.timeout)
    print(f"hub_reachable: {'yes' if reachable else 'no'} ({reason})", file=sys.stderr)
    return 0 if reachable else 1


if __name__ == "__main__":
    sys.exit(main())
