from megatron_longvita.config.parallel import ParallelConfig

__all__ = ["ParallelConfig"]
