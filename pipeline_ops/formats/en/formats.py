# The console's dates: seconds and the time zone everywhere (an operator compares them with logs).
DATETIME_FORMAT = "Y-m-d H:i:s T"
SHORTDATETIME_FORMAT = "Y-m-d H:i:s T"
DATE_FORMAT = "Y-m-d"
SHORT_DATE_FORMAT = "Y-m-d"
TIME_FORMAT = "H:i:s"
