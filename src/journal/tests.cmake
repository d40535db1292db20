agorafs_add_test(journal_test ${CMAKE_CURRENT_LIST_DIR}/journal_test.cc)
