from backup_tool.cli import main

main()
