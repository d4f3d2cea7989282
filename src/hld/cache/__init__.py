"""The offline teacher cache: its format (codec, store, meta), its writer and reader, and `build`, which
sizes and runs a build for a run config (`hld cache-teacher`, `hld run`/`hld study` once per cache group).
The format modules rank below `hld.train` (the loop reads a cache); `build` above it (docs/cache-format.md)."""
