from megatron_longvita.serve.cli import main

main()
