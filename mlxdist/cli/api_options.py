"""The API's guard options of `launch` and `serve`, checked before anything starts: the key
(from --api-key, MLXDIST_API_KEY or --api-key-file), whether the address the API would listen
on is beyond this machine, and the settings rank 0 is given (launcher/rankspec.py RankSpec)."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import typer

from launcher.rankspec import DRAFT_TOKENS, SPECULATIVE
from quantize.errors import UserError

DEFAULT_BODY_MB = 4  # a request body larger than this is refused (413)
MAX_DRAFT_TOKENS = 16  # as RankSpec's draft_tokens takes
MTP_DRAFT_TOKENS = 1  # drafts per step with R1's MTP layer, by default: it predicts one token ahead

# The options launch and serve share (one definition each; typer reads them as defaults).
KEY_OPTION = typer.Option(
    None,
    "--api-key",
    envvar="MLXDIST_API_KEY",
    help="API key every request must send as a bearer token; given here it is visible to other "
    "users in ps: prefer MLXDIST_API_KEY or --api-key-file",
)
KEY_FILE_OPTION = typer.Option(
    None,
    "--api-key-file",
    help="file holding the API key (its first line), kept off the command line",
)
INSECURE_OPTION = typer.Option(
    False,
    "--insecure-no-api-key",
    help="serve the API with no key on an address beyond this machine (anyone who reaches it "
    "may use it)",
)
BODY_OPTION = typer.Option(
    DEFAULT_BODY_MB,
    "--max-body-mb",
    min=1,
    max=1024,
    help="largest request body the API reads, in MiB",
)
DOCS_OPTION = typer.Option(
    False, "--docs", help="serve /docs, /redoc and /openapi.json (off by default)"
)
ALLOWED_HOST_OPTION = typer.Option(
    [],
    "--allowed-host",
    help="another name clients reach the API by (Host header), beyond the bound address and "
    "this machine's name (repeatable)",
)
CORS_OPTION = typer.Option(
    [],
    "--cors-origin",
    help="browser origin allowed to call the API, e.g. http://localhost:3000 (repeatable; none "
    "by default)",
)

# The KV cache options of launch, serve and bench (RankSpec's kv_bits and prompt_cache_bytes).
KV_BITS_OPTION = typer.Option(
    None,
    "--kv-bits",
    help="quantise every rank's KV cache to 4 or 8 bits, as mlx-lm's quantised cache (about "
    "a quarter or half of its memory; not for sliding-window or DeepSeek MLA models)",
)
PROMPT_CACHE_OPTION = typer.Option(
    None,
    "--prompt-cache-bytes",
    metavar="SIZE",
    help="memory per rank for the KV caches of known prefixes: 0 (off), bytes, 512MiB or 2GB "
    "(default: half of what the plan leaves on the fullest rank)",
)

# Speculative decoding on launch, serve and bench (RankSpec's speculative and draft_tokens).
SPECULATIVE_OPTION = typer.Option(
    "none",
    "--speculative",
    metavar="none|ngram|mtp",
    help="draft tokens and check them in one step (greedy answers unchanged): ngram by prompt "
    "lookup on rank 0; mtp with R1's multi-token-prediction layer (a model converted with "
    "`mlxdist quantize --keep-mtp`)",
)
DRAFT_TOKENS_OPTION = typer.Option(
    None,
    "--draft-tokens",
    metavar="K",
    help=f"tokens drafted per step with --speculative, 1 to {MAX_DRAFT_TOKENS} "
    f"(default {DRAFT_TOKENS} for ngram, {MTP_DRAFT_TOKENS} for mtp: R1's layer predicts one "
    "token ahead)",
)

_KEY = re.compile(r"[!-~]{8,256}")  # printable ASCII, no space: one bearer token, one line
_ORIGIN = re.compile(
    r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?|https?://\[[0-9a-fA-F:.]+\](:[0-9]{1,5})?"
)
_HOST = re.compile(r"[A-Za-z0-9.\-]{1,253}|\[?[0-9a-fA-F:.]{2,45}\]?")


def api_key(key: str | None, key_file: Path | None) -> str | None:
    """The key given, read from key_file when given; one line on a key that cannot be one."""
    key = key or None  # an empty MLXDIST_API_KEY is none
    if key and key_file:
        raise UserError("give --api-key or --api-key-file, not both")
    if key_file is not None:
        try:
            lines = key_file.expanduser().read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the API key file {key_file}: {_reason(e)}") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise UserError(f"the API key file {key_file} is empty: put the key on its first line")
    if key is not None and not _KEY.fullmatch(key):
        raise UserError(
            "the API key must be 8 to 256 printable characters without spaces "
            "(e.g. from: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return key or None


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


def beyond_loopback(host: str | None) -> bool:
    """Would a server bound to host be reachable from other machines? None: a cluster address."""
    if host is None:
        return True
    host = host.strip("[]").lower()
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name: whatever it resolves to may be any interface


def check_exposure(
    host: str | None, key: str | None, insecure: bool, flag: str, what: str = "the API"
) -> None:
    """Refuses an API open to the network without a key, unless the user said so; host None
    for an API on a cluster address (flag: how the user asked for it)."""
    if key is None and not insecure and beyond_loopback(host):
        raise UserError(
            f"{flag} would serve {what} beyond this machine with no key: pass --api-key KEY "
            "(or MLXDIST_API_KEY, --api-key-file PATH), or --insecure-no-api-key to serve it open"
        )


def kv_settings(kv_bits: int | None, prompt_cache_bytes: str | None) -> dict:
    """--kv-bits and --prompt-cache-bytes checked: {"kv_bits", "prompt_cache_bytes"} (None:
    not quantised; the launcher's budget from the plan)."""
    from launcher.planner import parse_bytes

    if kv_bits is not None and kv_bits not in (4, 8):
        raise UserError(f"--kv-bits takes 4 or 8, not {kv_bits}")
    budget = None
    if prompt_cache_bytes is not None:
        try:
            budget = parse_bytes(prompt_cache_bytes)
        except ValueError as e:
            raise UserError(f"--prompt-cache-bytes: {e}") from None
    return {"kv_bits": kv_bits, "prompt_cache_bytes": budget}


def speculative_settings(speculative: str, draft_tokens: int | None) -> dict:
    """--speculative and --draft-tokens checked: {"speculative", "draft_tokens"}, rank 0's."""
    if speculative not in SPECULATIVE:
        names = f"{', '.join(SPECULATIVE[:-1])} or {SPECULATIVE[-1]}"
        raise UserError(f"--speculative takes {names}, not {speculative!r}")
    if draft_tokens is None:  # R1's one MTP module predicts one token ahead
        default = MTP_DRAFT_TOKENS if speculative == "mtp" else DRAFT_TOKENS
        return {"speculative": speculative, "draft_tokens": default}
    if not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise UserError(f"--draft-tokens takes 1 to {MAX_DRAFT_TOKENS}, not {draft_tokens}")
    if speculative == "none":
        raise UserError(
            "--draft-tokens is for --speculative ngram or mtp: without it nothing is drafted"
        )
    return {"speculative": speculative, "draft_tokens": draft_tokens}


def check_kv_bits(model: Path, kv_bits: int | None) -> None:
    """Refuses, in one line, --kv-bits for a model whose caches mlx-lm cannot quantise."""
    from launcher.kvbits import check_kv_bits as check
    from quantize.checkpoint import read_config

    if kv_bits is None:
        return
    try:
        check(read_config(model), kv_bits)
    except ValueError as e:
        raise UserError(str(e)) from None


def api_settings(
    key: str | None,
    max_body_mb: int,
    docs: bool,
    allowed_hosts: list[str],
    cors_origins: list[str],
) -> dict:
    """What rank 0 is given for its API (the key travels apart, never on a command line)."""
    for name in allowed_hosts:
        if not _HOST.fullmatch(name):
            raise UserError(f"--allowed-host takes a host name or address, not {name!r}")
    for origin in cors_origins:
        if not _ORIGIN.fullmatch(origin):
            raise UserError(
                f"--cors-origin takes an origin such as http://localhost:3000, not {origin!r}"
            )
    return {
        "api_key": key,
        "max_body_mb": max_body_mb,
        "docs": docs,
        "allowed_hosts": tuple(allowed_hosts),
        "cors_origins": tuple(cors_origins),
    }
