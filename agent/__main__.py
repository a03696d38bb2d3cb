from agent.commands.cli import main

main()
