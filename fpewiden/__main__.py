from fpewiden.cli import main

main()
