from fedcare.server.migrations import _main

_main()
