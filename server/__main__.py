from orgbilling.server.cli import main

main()
