from moekit.cli.main import main

raise SystemExit(main())
