from stacyvm_server.cli import main

main()
