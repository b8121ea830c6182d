from expert_server.server import main

raise SystemExit(main())
