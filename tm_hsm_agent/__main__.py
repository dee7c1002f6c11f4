from tm_hsm_agent.cli import main

main()
