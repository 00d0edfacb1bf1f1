from backup_tool.cli.entry import main

main()
