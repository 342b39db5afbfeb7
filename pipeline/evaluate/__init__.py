"""The evaluate job: accuracy and speed on UKBench / Holidays."""
