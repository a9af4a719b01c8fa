from meshpipe.cli import main

main()
