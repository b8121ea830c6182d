from predictor_service.cli import main

raise SystemExit(main())
