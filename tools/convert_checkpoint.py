"""HF <-> megatron-core checkpoint conversion; see megatron_longvita/checkpoint/convert.py."""

from megatron_longvita.checkpoint.convert import main

if __name__ == "__main__":  # dist_checkpointing's writer re-imports __main__: keep the guard
    main()
