from lytools.cli import main

main()
