from backup_tool.entry import main

main()
