"""`growrun report`: comparison tables and plots of sweeps (entry point: growrun.report.cli.report_main).

    runs.py       find run directories, read their files, decide which runs are usable
    table.py      group runs by the swept keys, mean and std over seeds
    reference.py  the TINY paper's reported numbers and when a group is comparable to them
    render.py     report.md and report.csv
    plots.py      the PNG figures
    cli.py        argument parsing and atomic writing
"""
