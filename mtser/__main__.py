from mtser.cli.main import main

main()
