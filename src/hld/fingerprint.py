"""Identities of the things caches and manifests must match: files, tokenizers, token windows."""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path

import numpy as np


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_state(path: Path) -> str:
    """The state of a file as the kernel keeps it, for the stamps that let a verified checksum be reused
    (token-store shards, teacher-cache part files): device, inode, size, mtime and **ctime**. A write
    through the file system changes the ctime, which no call can set back (`touch -r` and `os.utime`
    restore the mtime only), and a file renamed or copied over another is another inode: a file damaged in
    place with its size and mtime kept is hashed again, never trained on. Not covered: damage below the
    file system (media bit rot), which `hld tokenize --verify` / `hld cache-teacher --verify` re-hash
    (docs/runs.md, "What is verified when")."""
    st = Path(path).stat()
    return f"{st.st_dev}:{st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"


def files_fingerprint(paths, h=None) -> str:
    """A cheap identity of files (resolved names, sizes, mtimes; never their bytes), fed to `h` if given."""
    h = h or hashlib.sha256()
    for p in paths:
        st = Path(p).stat()
        h.update(f"{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def sha256_mismatch(directory: Path, recorded: dict) -> str | None:
    """The first file named in `recorded` ({file name: sha256}) that is missing from `directory` or whose
    sha256 differs; None when every one matches."""
    for name, digest in recorded.items():
        path = Path(directory) / str(name)
        if not path.is_file() or file_sha256(path) != digest:
            return str(name)
    return None


_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (its size, fingerprint)


def _memoised(cache: weakref.WeakKeyDictionary, tokenizer, size: int, compute) -> str:
    """`compute(tokenizer)`, kept per tokenizer object while its size stays `size` (a token added since:
    computed again); a tokenizer that cannot be weakly referenced is not memoised."""
    try:
        known, fp = cache[tokenizer]
        if known == size:
            return fp
    except (KeyError, TypeError):
        pass
    fp = compute(tokenizer)
    try:
        cache[tokenizer] = (size, fp)
    except TypeError:
        pass
    return fp


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of the ids a tokenizer gives a text (the token store's and the teacher cache's key): its
    vocabulary (pieces and ids), BOS and EOS, and for a fast tokenizer what else decides the ids, its
    `tokenizer.json` (`_ids_spec`): two tokenizers with one vocabulary and other merges, normaliser or
    pre-tokenizer tokenise a text differently and must not share a store. Computed once per tokenizer object
    (a 262k vocabulary takes a while to hash, and every store and cache asks)."""
    return _memoised(_TOKENIZERS, tokenizer, len(tokenizer), _tokenizer_fingerprint)


def _tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    spec = _spec_digest(tokenizer)
    if spec is not None:  # its tokenizer.json, the vocabulary and added tokens in it
        h.update(spec.encode())
    else:  # a slow tokenizer has no spec to read: its vocabulary alone
        for piece, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            h.update(f"{idx}\t{piece}\n".encode("utf-8", "surrogatepass"))
    h.update(f"bos={tokenizer.bos_token_id} eos={tokenizer.eos_token_id}".encode())
    return h.hexdigest()[:16]


def _backend(tokenizer):
    """A fast tokenizer's `tokenizers.Tokenizer` (or the one given), None for a slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return tokenizer if backend is None and hasattr(tokenizer, "to_str") else backend


_SPEC_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (vocabulary size, digest)


def _spec_digest(tokenizer) -> str | None:
    """sha256 of `_ids_spec`, computed once per tokenizer object for both fingerprints (Gemma 3's
    tokenizer.json is 12 MB of JSON to parse); None for a slow tokenizer."""
    if _backend(tokenizer) is None:
        return None
    return _memoised(
        _SPEC_DIGESTS, tokenizer, len(tokenizer.get_vocab()), lambda t: hashlib.sha256(_ids_spec(t)).hexdigest()
    )


def _ids_spec(tokenizer) -> bytes | None:
    """A fast tokenizer's `tokenizer.json` (vocabulary, merges, normaliser, pre-tokenizer, post-processor,
    decoder, added tokens) less its truncation and padding, which a call with `truncation=`/`padding=` sets on
    the object itself and which no store or window depends on; None for a slow tokenizer."""
    backend = _backend(tokenizer)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return json.dumps(spec, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


_SPECS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (vocabulary size, spec fingerprint)


def tokenizer_spec_fingerprint(tokenizer) -> str:
    """Identity of everything that decides a fast tokenizer's ids **and offsets**: its `tokenizer.json`
    (`_ids_spec`: vocabulary, merges, normaliser, pre-tokenizer, decoder, post-processor) and its BOS, EOS and
    PAD ids: the key of an aligned store. A `tokenizers.Tokenizer` or a Hugging Face fast tokenizer;
    computed once per object."""
    return _memoised(_SPECS, tokenizer, len(tokenizer.get_vocab()), _spec_fingerprint)  # a token added: another


def _spec_fingerprint(tokenizer) -> str:
    spec = _spec_digest(tokenizer)
    assert spec is not None, "an aligned store needs a fast tokenizer (offsets), checked before"
    h = hashlib.sha256(spec.encode())
    specials = [getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")]
    h.update(f"bos={specials[0]} eos={specials[1]} pad={specials[2]}".encode())
    return h.hexdigest()[:16]


def windows_fingerprint(windows) -> str:
    """Identity of packed token windows: a token store's view names itself (its store's manifest:
    tokenizer, source, shard checksums; seq_len; count), an array is hashed (content and shape)."""
    named = getattr(windows, "fingerprint", None)
    if isinstance(named, str):
        return named
    arr = np.ascontiguousarray(windows, dtype=np.int32)
    return hashlib.sha256(str(arr.shape).encode() + arr.tobytes()).hexdigest()[:20]
