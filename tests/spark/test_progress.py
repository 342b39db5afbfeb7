"""Progress: drawn from Spark's status tracker on a terminal, silent when not on one."""
import io

from pipeline.stages import progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_enabled_only_on_a_terminal_unless_forced():
    assert progress.enabled("auto", _Tty()) is True
    assert progress.enabled("auto", io.StringIO()) is False
    assert progress.enabled("always", io.StringIO()) is True
    assert progress.enabled("never", _Tty()) is False


def test_stage_counts_the_tasks_of_its_own_jobs(spark, capsys):
    spark.range(100, numPartitions=3).count()  # a job outside any stage is not counted
    with progress.spark_stage(spark, "tstage", "always", items=500) as group:
        spark.range(1000, numPartitions=5).selectExpr("sum(id)").collect()
    done, total = progress.task_fraction(spark, group)
    assert done == total >= 5
    err = capsys.readouterr().err
    assert "tstage" in err and "500/500" in err
    assert spark.sparkContext.getLocalProperty("spark.jobGroup.id") is None
    with progress.spark_stage(spark, "quiet", "never") as group:
        spark.range(10).count()
    assert group is None and "quiet" not in capsys.readouterr().err
